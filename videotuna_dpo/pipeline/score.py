"""``videotuna score``: videos -> scores.jsonl, one record per video (raw scores and the OmniScore), resumable.

Each line is appended whole and fsynced; a trailing partial line (a killed run) is dropped on the
next start, videos already in the file are skipped, and unreadable or too-short videos are written
as ``"status": "failed"`` lines with the reason, never scored.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm import tqdm

from videotuna_dpo.data.scores import ScoresFile
from videotuna_dpo.data.video_io import VideoReadError, read_video_and_fps
from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import check_writable_file, is_temporary
from videotuna_dpo.pipeline.prompts import load_prompts
from videotuna_dpo.scoring.base import default_device
from videotuna_dpo.scoring.build import build_scorers, describe_scorer, omniscore_config, score_batch
from videotuna_dpo.scoring.omniscore import DIMENSIONS, omniscore, omniscore_dimensions

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif"}
LIST_SUFFIXES = {".txt", ".lst"}
DEFAULT_SCORERS = DIMENSIONS  # the seven VBench dimensions of the OmniScore


# ---------------------------------------------------------------- inputs


def list_videos(spec: str | os.PathLike) -> list[Path]:
    """A directory (searched recursively), a .txt list (one path per line) or one video -> sorted paths."""
    path = Path(spec)
    if path.is_dir():
        # Left out: temporaries of a killed writer and macOS "._" metadata files; a video named ".x.mp4" is a video.
        found = sorted(
            p for p in path.rglob("*")
            if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file() and not is_temporary(p.name)
            and not p.name.startswith("._")
        )
        if not found:
            raise UserError(f"--videos {path}: no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in this directory")
        return found
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        found = [(path.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines if ln and not ln.startswith("#")]
        if not found:
            raise UserError(f"--videos {path}: the list names no videos")
        return found
    if path.is_file():
        return [path]
    raise UserError(f"--videos {path}: not a directory, a .txt list of videos, or a video file")


def unique_videos(paths: Sequence[Path]) -> list[Path]:
    """``paths`` with each video once (the same file by any spelling), saying how many repeats were dropped."""
    unique: dict[Path, Path] = {}
    repeats = []
    for path in paths:
        if path.resolve() in unique:
            repeats.append(path)
        else:
            unique[path.resolve()] = path
    if repeats:
        print(f"--videos: {len(repeats)} repeated path(s) dropped, each video is scored once (first: {repeats[0]})",
              file=sys.stderr)
    return list(unique.values())


# ---------------------------------------------------------------- scoring


def _unscorable(models: Mapping[str, Any], shape: Sequence[int]) -> str | None:
    """The reasons (``scorer: why``) a decoded ``[F, C, H, W]`` video cannot be scored, or None.

    Scorers may declare ``unscorable(num_frames, height, width)`` (BaseScorer does); others only
    ``min_frames``, which the caller checks.
    """
    reasons = []
    for name, scorer in models.items():
        check = getattr(scorer, "unscorable", None)
        why = check(int(shape[0]), int(shape[2]), int(shape[3])) if callable(check) else None
        if why:
            reasons.append(f"{name}: {why}")
    return "; ".join(reasons) or None


def _check_resume(records: list[dict], scorers: Mapping[str, Any], out: Path) -> None:
    current = {name: str(s.version) for name, s in scorers.items()}
    for record in reversed(records):
        if record.get("status") == "ok":
            before = {name: str(d.get("version")) for name, d in record.get("scorers", {}).items()}
            if before != current:
                raise UserError(
                    f"{out} holds scores made with scorers {before}, but this run uses {current}; "
                    f"scores of different scorers do not mix: pass the same --scorers/--option, or a new --out"
                )
            return


def _prefetch(fn, items: Sequence, depth: int) -> Iterator[tuple[Any, Future]]:
    """Yield (item, future of fn(item)) in order, keeping ``depth`` decodes ahead in a thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue: deque = deque()
        it = iter(items)
        for item in it:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > depth:
                yield queue.popleft()
        while queue:
            yield queue.popleft()


def score_videos(
    videos: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    prompts: str | os.PathLike | None = None,
    scorers: Sequence[str] | None = None,
    batch_size: int = 4,
    device: str | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    weights: Mapping[str, float] | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    registry=None,
    announce: bool = False,
) -> dict:
    """Score videos into ``out`` (JSONL); returns ``{"scored", "failed", "skipped", "recovered_bytes", "out"}``.

    ``announce`` prints each scorer's backend and weight files to stderr before scoring (the CLI does).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_writable_file(out, f"--out {out}")  # before the scorers load
    paths = unique_videos(list_videos(videos) if isinstance(videos, (str, os.PathLike)) else [Path(v) for v in videos])
    prompt_map = load_prompts(paths, prompts)
    names = list(scorers or DEFAULT_SCORERS)
    if len(set(names)) != len(names):
        raise UserError(f"--scorers lists a scorer twice: {','.join(names)}")
    device = device or default_device()
    models = build_scorers(names, device, options or {}, registry)
    config = omniscore_config(models, weights)
    with_omniscore = bool(omniscore_dimensions(names, config))
    if not with_omniscore:  # said once: every record then holds raw scores only
        print(f"OmniScore left out: none of the scorers {', '.join(names)} is one of its dimensions "
              f"({', '.join(config.ranges)}) or declares a score_range; the records hold their raw scores "
              f"(`videotuna pairs --by NAME` pairs by one of them)", file=sys.stderr)
    described = {name: describe_scorer(s) for name, s in models.items()}
    if announce:  # before a long run, say which model scores each dimension
        print("\n".join(["scorers:", *backend_lines(described)]), file=sys.stderr)
    min_frames = max([int(getattr(s, "min_frames", 1)) for s in models.values()] + [1])

    store = ScoresFile(out)
    records = store.recover()
    _check_resume(records, models, store.path)
    latest = {r["path"]: r for r in records}
    done = {p for p, r in latest.items() if r["status"] == "ok" or not retry_failed}
    todo = [p for p in paths if str(p.resolve()) not in done]
    summary = {"scored": 0, "failed": 0, "skipped": len(paths) - len(todo),
               "recovered_bytes": store.dropped_bytes, "out": str(store.path)}
    if store.dropped_bytes:
        print(f"{store.path}: dropped a partial last line ({store.dropped_bytes} bytes) left by an interrupted run",
              file=sys.stderr)

    def fail(path: Path, reason: str) -> None:
        store.append({"path": str(path.resolve()), "prompt": prompt_map[path][0], "status": "failed", "reason": reason})
        summary["failed"] += 1

    def flush(batch: list[tuple[Path, Any, float | None]]) -> None:
        levels = torch.stack([frames for _, frames, _ in batch])  # uint8 [B, F, C, H, W], as decoded
        clip = levels.to(device).float().div_(255.0)
        texts = [prompt_map[p][0] for p, _, _ in batch]
        fps = batch[0][2]  # one rate per batch
        raw = score_batch(models, clip, texts, fps, levels)  # one set of 8-bit frames and flow for all scorers
        for i, (path, frames, _) in enumerate(batch):
            values = {name: float(raw[name][i]) for name in names}
            bad = [n for n, v in values.items() if v != v or v in (float("inf"), float("-inf"))]
            if bad:
                fail(path, f"scorer(s) {', '.join(bad)} returned a non-finite value")
                continue
            record = {"path": str(path.resolve()), "prompt": texts[i], "status": "ok", "raw": values}
            if with_omniscore:
                agg = omniscore(values, config)
                record.update({key: agg[key] for key in ("normalized", "quality", "semantic", "omniscore",
                                                         "dimensions_used", "weights")})
            store.append({
                **record, "scorers": described,
                "frames": int(frames.shape[0]), "height": int(frames.shape[2]), "width": int(frames.shape[3]),
                "fps": fps,
                "meta": prompt_map[path][1],
            })
            summary["scored"] += 1
        bar.update(len(batch))

    def decode(path: Path):
        try:
            return read_video_and_fps(path)
        except VideoReadError as exc:
            return exc

    batch: list[tuple[Path, Any, float | None]] = []
    with tqdm(total=len(todo), unit="video", desc="score", disable=not progress) as bar:
        for path, future in _prefetch(decode, todo, depth=max(2, batch_size)):
            decoded = future.result()
            if isinstance(decoded, VideoReadError):
                fail(path, decoded.reason)
                bar.update(1)
                continue
            frames, fps = decoded
            if frames.shape[0] < min_frames:
                problem = f"too short: {frames.shape[0]} frame(s); the scorers need at least {min_frames}"
            else:
                problem = _unscorable(models, frames.shape)
            if problem:
                fail(path, problem)
                bar.update(1)
                continue
            if batch and (batch[0][1].shape != frames.shape or batch[0][2] != fps):
                flush(batch)
                batch = []
            batch.append((path, frames, fps))
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    return summary


def backend_lines(described: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per scorer: its version (which backend) and the weight files it loaded."""
    lines = []
    for name, d in described.items():
        files = d.get("weights")
        used = ", ".join(f"{k}={v}" for k, v in files.items()) if isinstance(files, Mapping) else (files or "no weights")
        lines.append(f"  {name}: {d.get('version')} [{used}]")
    return lines
