"""Atomic writes: a temporary sibling, then ``os.replace``, so readers see the old file or the new one.

Files and directories get the permissions a plain ``open()``/``mkdir()`` would give (0666/0777 minus the
umask), not ``mkstemp``'s 0600 or ``mkdtemp``'s 0700, so videos, scores and weights stay readable by a team.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from videotuna_dpo.errors import UserError


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


# Temporary names: "." + the target's name + "~" + mkstemp's 8 random characters (+ a suffix). "~" is in no name this
# package writes for good (prompt ids are reduced to [A-Za-z0-9_.-]), so cleanup can never take a finished file.
_TEMPORARY = re.compile(r"\..+~[a-z0-9_]{8}(\.[A-Za-z0-9]+)?")


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}~"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file or directory of :func:`atomic_file` / :func:`atomic_directory`."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_stale_temporaries(directory: str | Path) -> int:
    """Delete the temporary files a killed writer left in ``directory`` (nothing else); returns how many."""
    stale = [p for p in Path(directory).iterdir() if is_temporary(p.name) and p.is_file()]
    for path in stale:
        path.unlink()
    return len(stale)


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path next to ``path``; when the block succeeds it becomes ``path``.

    ``suffix`` keeps an extension on the temporary name for writers that look at it (PNG, mp4).
    On any error, interruption included, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=suffix, dir=path.parent)
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


@contextlib.contextmanager
def _staging_directory(near: Path) -> Iterator[Path]:
    """An empty directory next to ``near``, removed afterwards if still there."""
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(near), dir=near.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _follow_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes ``mkdir``/``open`` give (``mkdtemp``/``mkstemp``: 0700/0600)."""
    umask = _current_umask()
    for directory, _, files in os.walk(root):
        os.chmod(directory, 0o777 & ~umask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & stat.S_IXUSR
                os.chmod(path, (0o777 if executable else 0o666) & ~umask)


def _replace(source: Path, target: Path) -> None:
    """Put ``source`` (a file, a directory or nothing) where ``target`` is, removing the old ``target``."""
    if source.is_dir() and target.is_dir():
        old = target.with_name(f".{target.name}.old")  # a directory cannot be renamed over a full one
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old)
    elif source.exists():
        os.replace(source, target)
    elif target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty directory next to ``target``; when the block succeeds it replaces ``target`` as a whole.

    On any error, interruption included, the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    with _staging_directory(target) as tmp:
        yield tmp
        _follow_umask(tmp)
        _replace(tmp, target)


@contextlib.contextmanager
def atomic_entries(directory: str | Path, names: Sequence[str]) -> Iterator[Path]:
    """Yield a staging directory; when the block succeeds each of ``names`` there replaces its namesake in
    ``directory`` (in order; one the block did not write is removed). On error ``directory`` is untouched.
    """
    directory = Path(directory)
    with _staging_directory(directory / "staging") as stage:
        yield stage
        _follow_umask(stage)
        for name in names:
            _replace(stage / name, directory / name)


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Check that directory ``path`` can be written in (or created), before any long work; nothing is created.

    ``what`` names the option in messages (e.g. ``"--out samples"``); a file in the way or no permission is a UserError.
    """
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a directory; give a directory (it is created if missing)")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise UserError(f"{what}: cannot write in {existing} ({exc.strerror or exc})") from None
    return path


def check_writable_file(path: str | Path, what: str) -> Path:
    """Check that file ``path`` can be created or appended to; nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: {path} is a directory; give a file path (e.g. {path / 'scores.jsonl'})")
    check_writable_dir(path.parent, what)
    try:
        if path.exists():
            open(path, "ab").close()
    except OSError as exc:
        raise UserError(f"{what}: cannot write {path} ({exc.strerror or exc})") from None
    return path
