"""Prompt files: .txt (one per line) or .json (a list, or {id: prompt})."""

from __future__ import annotations

import re
from pathlib import Path

from videotuna_dpo.errors import UserError
from videotuna_dpo.user_files import read_bounded, read_json

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def load_prompt_file(path: str | Path) -> list[tuple[str, str]]:
    """``[(prompt_id, prompt)]`` in file order; ids are ``p00000``... for .txt and lists, keys for dicts."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: file not found")
    if path.suffix.lower() == ".txt":
        text = read_bounded(path, "lines").decode("utf-8")
        items = [(f"p{i:05d}", line.strip()) for i, line in enumerate(l for l in text.splitlines() if l.strip())]
    elif path.suffix.lower() == ".json":
        try:
            data = read_json(path)
        except UserError as exc:
            raise UserError(f"--prompts {exc}") from None
        if isinstance(data, list):
            items = [(f"p{i:05d}", p) for i, p in enumerate(data)]
        elif isinstance(data, dict):
            items = [(str(k), v) for k, v in data.items()]
        else:
            raise UserError(f"--prompts {path}: expected a JSON list of prompts or an object {{id: prompt}}")
    else:
        raise UserError(f"--prompts {path}: use .txt (one prompt per line) or .json (list or {{id: prompt}})")
    problems = []
    seen: dict[str, str] = {}
    out = []
    for i, (pid, prompt) in enumerate(items):
        if not isinstance(prompt, str) or not prompt.strip():
            problems.append(f"entry {i} ({pid}): empty or non-string prompt {prompt!r}")
            continue
        safe = _SAFE.sub("_", pid)
        if safe in seen:
            problems.append(f"entry {i}: id {pid!r} collides with {seen[safe]!r} as a file name")
            continue
        seen[safe] = pid
        out.append((safe, prompt.strip()))
    if problems:
        raise UserError(f"--prompts {path}: " + "; ".join(problems[:10]))
    if not out:
        raise UserError(f"--prompts {path}: no prompts")
    return out
