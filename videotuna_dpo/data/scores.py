"""The scores file of ``videotuna score``: ``scores.jsonl``, one JSON record per video, appended whole.

Each line is a record with at least ``path`` (the video's absolute path) and ``status`` (``"ok"`` with
``raw`` scores, and the OmniScore fields when a dimension was scored, or ``"failed"`` with a ``reason``). A
line is written with one fsynced append; a trailing partial line is a killed writer's and is dropped (by the
writer) or left out (by readers), and the last record of a video is the one that counts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping

from videotuna_dpo.errors import UserError
from videotuna_dpo.user_files import read_bounded


class ScoresFile:
    """Append-only JSONL with whole-line, fsynced appends; recovers from a killed writer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.dropped_bytes = 0

    def recover(self) -> list[dict]:
        """Drop a trailing partial line (truncating the file) and return the complete records."""
        if not self.path.exists():
            return []
        data = read_bounded(self.path, "lines")
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.dropped_bytes = len(data) - end
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
        return parse_records(data[:end], self.path)

    def append(self, record: Mapping[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)


def numbered_records(data: bytes, path: Path) -> Iterator[tuple[int, dict]]:
    """The records of scores.jsonl bytes with their 1-based line numbers; a malformed line is an error naming it."""
    for number, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            raise UserError(f"{path}:{number}: not a JSON record ({exc}); remove or fix that line") from exc
        if not isinstance(record, dict) or "path" not in record or "status" not in record:
            raise UserError(f"{path}:{number}: a score record needs \"path\" and \"status\" keys")
        yield number, record


def parse_records(data: bytes, path: Path) -> list[dict]:
    return [record for _, record in numbered_records(data, path)]


def _complete_records(path: str | os.PathLike) -> tuple[Iterator[tuple[int, dict]], str | None]:
    """The numbered complete records of scores.jsonl, and a note on a partial last line left out (None if none)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: scores file not found")
    data = read_bounded(path, "lines")
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    try:
        json.loads(tail.strip() or b"{}")  # a last record lacking only its newline is complete
        return numbered_records(data, path), None
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        line = data.count(b"\n") + 1
    note = (f"{path}:{line}: ignored a partial last line ({len(tail)} bytes), left by an interrupted "
            f"`videotuna score` or a file cut short; rerun `videotuna score` with this --out to finish it")
    return numbered_records(data[:end], path), note


def read_scores(path: str | os.PathLike) -> dict[str, dict]:
    """scores.jsonl -> {video path: its last record}; a partial last line is left out (and said so), the file as is."""
    records, partial = _complete_records(path)
    if partial:
        print(partial, file=sys.stderr)
    return {r["path"]: r for _, r in records}


def record_line(path: str | os.PathLike, video: str) -> int:
    """The line number of ``video``'s last record in scores.jsonl, for messages that point at it."""
    return max(number for number, r in _complete_records(path)[0] if r["path"] == video)


def record_values(record: Mapping[str, Any]) -> dict[str, float]:
    """Every comparable number of a score record, by row name (raw/X, normalized/X, quality, ...)."""
    values = {f"raw/{k}": float(v) for k, v in (record.get("raw") or {}).items()}
    values.update({f"normalized/{k}": float(v) for k, v in (record.get("normalized") or {}).items()})
    for group in ("quality", "semantic", "omniscore"):
        if record.get(group) is not None:
            values[group] = float(record[group])
    return values
