"""Reading the YAML and JSON files users hand us (configs, train_data.yaml, metadata, pair.json, manifest,
scores, prompts, records) within bounds: a size cap, and YAML parsed by OmegaConf's loader, which refuses
aliases expanding past its node limit (``OMEGACONF_MAX_YAML_EXPANDED_NODES``). Refusals name the file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from videotuna_dpo.errors import UserError, first_line

MAX_BYTES = {
    "yaml": 16 << 20,  # configs and dataset lists are kilobytes; YAML parsing is slow well before this
    "json": 1 << 30,  # metadata and pair files of large datasets
    "lines": 4 << 30,  # scores.jsonl (a record per video) and prompt lists, parsed line by line
}


def read_bounded(path: str | Path, kind: str) -> bytes:
    """The bytes of ``path``; a file longer than ``MAX_BYTES[kind]`` is refused, naming it."""
    path, max_bytes = Path(path), MAX_BYTES[kind]
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # not stat(): a pipe or /proc file reports no size
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise UserError(f"{path}: larger than the {max_bytes:,} bytes accepted for a {kind} file; "
                        f"is it the right file?")
    return data


def load_yaml_config(path: str | Path) -> DictConfig | ListConfig:
    """A YAML file as an OmegaConf config, within the size cap and OmegaConf's alias-expansion limit."""
    path = Path(path)
    data = read_bounded(path, "yaml")
    try:
        return OmegaConf.load(io.StringIO(data.decode("utf-8")))
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, OSError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: malformed YAML ({first_line(exc, limit=400)})") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file as plain dicts and lists, read as :func:`load_yaml_config` reads configs."""
    return OmegaConf.to_container(load_yaml_config(path))


def read_json(path: str | Path) -> Any:
    """A JSON file within the size cap; malformed or too deeply nested JSON is refused, naming the file."""
    path = Path(path)
    data = read_bounded(path, "json")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: malformed JSON ({first_line(exc) or type(exc).__name__})") from None
