"""Prompts: the prompts file of ``generate`` (.txt one per line, or .json a list or {id: prompt}), and each
video's prompt for ``score`` (a prompts file naming videos, or the sidecar record next to each video)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

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


def _sidecar(video: Path) -> dict:
    """The record a generator wrote next to ``video``: ``<video>.json`` (e.g. a.mp4.json) or ``<stem>.json``."""
    for candidate in (video.with_name(video.name + ".json"), video.with_suffix(".json")):
        if candidate.is_file():
            data = read_json(candidate)
            if not isinstance(data, dict):
                raise UserError(f"{candidate}: expected a JSON object with a \"prompt\" key")
            return data
    return {}


def _prompt_entries(prompts_file: Path) -> list[tuple[str, Any]] | list[str]:
    """Entries of a prompts file: (video key, prompt or record) pairs, or for .txt a plain prompt list."""
    if prompts_file.suffix.lower() == ".txt":
        text = read_bounded(prompts_file, "lines").decode("utf-8")
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    if prompts_file.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(read_bounded(prompts_file, "lines").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise UserError(f"{prompts_file}:{i}: not valid JSON ({exc})") from exc
        data: Any = rows
    else:
        data = read_json(prompts_file)
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        entries = []
        for i, row in enumerate(data):
            key = row.get("path", row.get("video")) if isinstance(row, dict) else None
            if key is None or "prompt" not in row:
                raise UserError(f"{prompts_file}: entry {i} needs \"path\" (or \"video\") and \"prompt\" keys, got {row!r}")
            entries.append((str(key), row))
    else:
        raise UserError(f"{prompts_file}: expected an object {{video: prompt}} or a list of {{path, prompt}}")
    return entries


def load_prompts(videos: Sequence[Path], prompts_file: str | os.PathLike | None = None) -> dict[Path, tuple[str, dict]]:
    """Each video -> (prompt, sidecar metadata).

    ``prompts_file``: .json ``{video path, file name or stem: prompt}`` or a list of ``{path, prompt}``,
    .jsonl of ``{path, prompt}``, or .txt with one prompt per line in the order of the sorted videos.
    Without it (or for videos it omits) the sidecar ``<video>.json``'s ``"prompt"`` is used.
    """
    meta = {v: _sidecar(v) for v in videos}
    prompts: dict[Path, str] = {v: m["prompt"] for v, m in meta.items() if isinstance(m.get("prompt"), str)}
    if prompts_file is not None:
        pf = Path(prompts_file)
        if not pf.is_file():
            raise UserError(f"--prompts {pf}: file not found")
        entries = _prompt_entries(pf)
        if entries and isinstance(entries[0], str):
            if len(entries) != len(videos):
                raise UserError(
                    f"--prompts {pf}: {len(entries)} prompt lines for {len(videos)} videos; a .txt file gives one "
                    f"prompt per video in sorted path order (or use .json {{video: prompt}})"
                )
            prompts.update(zip(videos, entries))
        else:
            index: dict[str, Path] = {}
            for v in videos:
                for key in (str(v.resolve()), str(v), v.name, v.stem):
                    index.setdefault(key, v)
            for key, value in entries:
                prompt = value.get("prompt") if isinstance(value, dict) else value
                if not isinstance(prompt, str):
                    raise UserError(f"--prompts {pf}: the prompt of {key!r} is not a string: {prompt!r}")
                target = index.get(str((pf.parent / key).resolve())) or index.get(key) or index.get(Path(key).name)
                if target is not None:
                    prompts[target] = prompt
    missing = [v for v in videos if v not in prompts]
    if missing:
        shown = ", ".join(str(v) for v in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"no prompt for {len(missing)} video(s): {shown}. Give --prompts FILE (.json {{file name: prompt}}, "
            f".jsonl, or .txt one per sorted video) or write <video>.json with a \"prompt\" key next to each video"
        )
    return {v: (prompts[v], {k: x for k, x in meta[v].items() if k != "prompt"}) for v in videos}
