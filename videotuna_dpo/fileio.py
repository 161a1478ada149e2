"""Atomic writes: a temporary sibling, then ``os.replace``, so readers see the old file or the new one.

Files get the permissions a plain ``open()`` would give (0666 minus the umask), not ``mkstemp``'s 0600,
so videos, scores and checkpoints stay readable by the rest of a team.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _current_umask() -> int:
    """The process umask, read from /proc where possible: setting it to read it (the portable way)
    briefly changes it for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _default_mode() -> int:
    return 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block succeeds it becomes ``path``.

    ``suffix`` keeps an extension on the temporary name for writers that look at it (PNG, mp4).
    On any error, interruption included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | Path, text: str) -> str:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return str(path)


def write_json_atomic(path: str | Path, data: Any) -> str:
    """Write ``data`` as JSON (no NaN or infinity) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False))
