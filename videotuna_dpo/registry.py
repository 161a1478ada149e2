"""Plugin manager of the ``videotuna`` entry point group and name -> factory lookups by kind."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pluggy

from videotuna_dpo import __version__, hookspecs
from videotuna_dpo import plugin as builtin
from videotuna_dpo.errors import UserError

ENTRY_POINT_GROUP = "videotuna"
BUILTIN_PLUGIN = "dpo"

# kind -> hook name; the order is the order of `videotuna plugins`.
KINDS = {
    "strategy": "videotuna_strategies",
    "scorer": "videotuna_scorers",
    "datamodule": "videotuna_datamodules",
    "model": "videotuna_models",
}


class PluginError(UserError):
    """A plugin is unknown, broken, or collides with another one."""


@dataclass(frozen=True)
class Entry:
    """One registered factory and where it came from."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str
    version: str


def installed_plugin_names(group: str = ENTRY_POINT_GROUP) -> dict[str, str]:
    """Entry point names of ``group`` -> providing distribution name, without importing them."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == group:
                found.setdefault(ep.name, dist.metadata["Name"])
    return found


class Registry:
    """Every strategy, scorer, datamodule and model backend contributed by the loaded plugins."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self._dists = {
            id(plugin): (dist.project_name, dist.version) for plugin, dist in pm.list_plugin_distinfo()
        }
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                dist, version = self._origin(impl.plugin)
                for name, factory in dict(impl.function() or {}).items():
                    previous = self._entries[kind].get(name)
                    if previous is not None:
                        raise PluginError(
                            f"{kind} name {name!r} is registered twice: by plugin {previous.plugin!r} "
                            f"of distribution {previous.distribution} and by plugin "
                            f"{impl.plugin_name!r} of distribution {dist}. Uninstall one of them or "
                            f"list only one in the config's `plugins:`."
                        )
                    self._entries[kind][name] = Entry(kind, name, factory, impl.plugin_name, dist, version)

    def _origin(self, plugin: object) -> tuple[str, str]:
        if id(plugin) in self._dists:
            return self._dists[id(plugin)]
        module = getattr(plugin, "__name__", "")
        if module.startswith("videotuna_dpo"):
            return _own_distribution()
        return ("<not installed>", "")

    @classmethod
    def load(cls, enabled: Iterable[str] | None = None, group: str = ENTRY_POINT_GROUP) -> "Registry":
        """Load the installed plugins of ``group``; with ``enabled``, only those named there."""
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        installed = installed_plugin_names(group)
        if enabled is not None:
            enabled = list(enabled)
            known = set(installed) | {BUILTIN_PLUGIN}
            unknown = [name for name in enabled if name not in known]
            if unknown:
                raise PluginError(
                    f"plugins: {', '.join(map(repr, unknown))} not installed; installed plugins: "
                    f"{', '.join(sorted(known))}"
                )
            for name in installed:
                if name not in enabled:
                    pm.set_blocked(name)
        try:
            pm.load_setuptools_entrypoints(group)
        except Exception as exc:  # a broken third-party plugin must say who it is
            raise PluginError(f"loading a plugin of entry point group {group!r} failed: {exc!r}") from exc
        # Running from a source tree without `pip install -e .`: still offer the built-in plugin.
        if not pm.has_plugin(BUILTIN_PLUGIN) and not pm.is_blocked(BUILTIN_PLUGIN):
            if enabled is None or BUILTIN_PLUGIN in enabled:
                pm.register(builtin, name=BUILTIN_PLUGIN)
        return cls(pm)

    def entries(self, kind: str | None = None) -> list[Entry]:
        """All entries, or those of one kind, sorted by kind then name."""
        kinds = [kind] if kind else list(KINDS)
        for k in kinds:
            self._check_kind(k)
        return [self._entries[k][n] for k in kinds for n in sorted(self._entries[k])]

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(self._entries[kind])

    def entry(self, kind: str, name: str) -> Entry:
        self._check_kind(kind)
        try:
            return self._entries[kind][name]
        except KeyError:
            names = ", ".join(self.names(kind)) or "(none)"
            raise PluginError(f"unknown {kind} {name!r}; installed {kind} names: {names}") from None

    def get(self, kind: str, name: str) -> Callable[..., Any]:
        """The factory registered as ``name`` of ``kind``; an unknown name lists the installed ones.

        A factory given as a ``"module:attribute"`` string is imported here, on first use, so that
        listing plugins never imports torch.
        """
        entry = self.entry(kind, name)
        if isinstance(entry.factory, str):
            return resolve_reference(entry.factory, f"{kind} {name!r} of {entry.distribution}")
        return entry.factory

    def create(self, kind: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(kind, name)(*args, **kwargs)

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KINDS)}")


def resolve_reference(reference: str, what: str) -> Any:
    """Import ``"package.module:attribute"``; errors say which registration pointed there."""
    module_name, _, attribute = reference.partition(":")
    if not attribute:
        raise PluginError(f"{what}: factory reference {reference!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{what}: cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise PluginError(f"{what}: module {module_name!r} has no attribute {attribute!r}") from None


def call_with_optional(function: Callable[..., Any], *args: Any, **optional: Any) -> Any:
    """``function(*args, **optional)``, each optional keyword passed only when ``function``'s signature names it
    (or takes ``**kwargs``): the arguments ``hookspecs`` marks optional, which a plugin may leave out."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): pass only what is required
        return function(*args)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return function(*args, **optional)
    return function(*args, **{k: v for k, v in optional.items() if k in params})


def _own_distribution() -> tuple[str, str]:
    try:
        return ("videotuna-dpo", importlib.metadata.version("videotuna-dpo"))
    except importlib.metadata.PackageNotFoundError:
        return ("videotuna-dpo (source tree)", __version__)
