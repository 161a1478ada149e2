"""VideoTuna-style OmegaConf YAML: loading, ``key=value`` overrides and schema validation.

Every error names the file and the full dotted path of the offending key.
"""

from __future__ import annotations

import difflib
import inspect
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from videotuna_dpo.errors import UserError
from videotuna_dpo.user_files import load_yaml_config
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a YAML config and apply command-line ``key=value`` overrides (dotted keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = load_yaml_config(path)
    except UserError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(cfg).__name__}")
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Merge ``["a.b=1", "c=[1,2]"]`` into ``cfg``; values are parsed as YAML."""
    dotlist = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-5)")
        dotlist.append(item)
    if not dotlist:
        return cfg
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot apply overrides {dotlist}: {exc}") from exc


def validate(node: Any, schema: type, where: str, source: str = "<config>") -> DictConfig:
    """Check ``node`` against the dataclass ``schema`` and fill its defaults.

    ``where`` is the dotted path of ``node`` in the whole config (e.g. ``"model"``); unknown keys,
    wrong types and missing mandatory values raise :class:`ConfigError` with the full dotted path.
    """
    base = OmegaConf.structured(schema)
    if node is None:
        node = {}
    try:
        merged = OmegaConf.merge(base, node)
    except (ConfigKeyError, ValidationError) as exc:
        relative = str(getattr(exc, "full_key", "") or getattr(exc, "key", "") or "")
        key = _join(where, relative)
        if isinstance(exc, ConfigKeyError):
            rel_parent, _, leaf = relative.rpartition(".")
            known = _known_keys(base, rel_parent)
            hint = difflib.get_close_matches(leaf, known, n=1)
            suggestion = f" Did you mean '{_join(_join(where, rel_parent), hint[0])}'?" if hint else ""
            raise ConfigError(
                f"{source}: unknown key '{key}'.{suggestion} Known keys there: {', '.join(known)}"
            ) from None
        raise ConfigError(f"{source}: bad value for '{key}': {exc.msg if hasattr(exc, 'msg') else exc}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"{source}: missing required key(s): {', '.join(_join(where, k) for k in missing)}"
        )
    return merged


def check_kwargs(options: Mapping[str, Any], target: Any, where: str, source: str = "<config>") -> dict:
    """Check that ``options`` are keyword arguments accepted by callable ``target``."""
    accepted = [
        name
        for name, p in inspect.signature(target).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    ]
    for key in options:
        if key not in accepted:
            hint = difflib.get_close_matches(key, accepted, n=1)
            suggestion = f" Did you mean '{_join(where, hint[0])}'?" if hint else ""
            raise ConfigError(f"{source}: unknown key '{_join(where, key)}'.{suggestion}")
    return dict(options)


Rule = tuple[Callable[[Any], bool], str]  # (is the value allowed, what is allowed, in words)
POSITIVE: Rule = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE: Rule = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
AT_LEAST_ONE: Rule = (lambda v: v >= 1, "an integer >= 1")
FINITE: Rule = (lambda v: math.isfinite(v), "a finite number")


def check_values(node: Any, where: str, rules: Mapping[str, Rule], source: str = "<config>") -> None:
    """Refuse a value outside its range before anything loads, naming the full key and what is allowed."""
    for key, (allowed, words) in rules.items():
        value = node.get(key) if hasattr(node, "get") else getattr(node, key, None)
        if value is None:
            continue
        try:
            ok = bool(allowed(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{source}: bad value for '{_join(where, key)}': {value!r} (expected {words})")


def plain(node: Any) -> Any:
    """A config node as plain dicts and lists (interpolations resolved), for JSON; anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _known_keys(base: DictConfig, rel_path: str) -> list[str]:
    try:
        node = OmegaConf.select(base, rel_path) if rel_path else base
    except MissingMandatoryValue:
        node = None
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)
