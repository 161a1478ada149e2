"""``videotuna score``: videos -> scores.jsonl, one record per video (raw scores and the OmniScore), resumable.

Each rank appends its lines whole and fsynced to ``<out>.parts/rank-<r>.jsonl``; when every rank is done, rank 0
merges the parts into ``out`` (one atomic rewrite, the new lines in the videos' sorted order) and removes them. A
trailing partial line (a killed run) is dropped, videos already in ``out`` or in a part are skipped, and
unreadable or too-short videos are written as ``"status": "failed"`` lines with the reason, never scored.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from videotuna_dpo.data.scores import ScoresFile, parse_records
from videotuna_dpo.data.video_io import VideoReadError, read_video_and_fps
from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import atomic_file, check_writable_file, is_temporary
from videotuna_dpo.jobs import Launch, Progress, chunked, is_main_process, local_device, rank_share, run_job
from videotuna_dpo.pipeline.prompts import load_prompts
from videotuna_dpo.scoring.build import build_scorers, describe_scorer, omniscore_config, score_batch, unscorable_reason
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
        why = unscorable_reason(scorer, shape[0], shape[2], shape[3])
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
    launch: Launch | None = None,
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
    device = device or local_device()
    models = build_scorers(names, device, options or {}, registry)
    config = omniscore_config(models, weights)
    with_omniscore = bool(omniscore_dimensions(names, config))
    if not with_omniscore and is_main_process():  # said once: every record then holds raw scores only
        print(f"OmniScore left out: none of the scorers {', '.join(names)} is one of its dimensions "
              f"({', '.join(config.ranges)}) or declares a score_range; the records hold their raw scores "
              f"(`videotuna pairs --by NAME` pairs by one of them)", file=sys.stderr)
    described = {name: describe_scorer(s) for name, s in models.items()}
    if announce and is_main_process():  # before a long run, say which model scores each dimension
        print("\n".join(["scorers:", *backend_lines(described)]), file=sys.stderr)
    min_frames = max([int(getattr(s, "min_frames", 1)) for s in models.values()] + [1])

    store = ScoresFile(out)
    records = store.recover()  # the merged file: only rank 0 writes it, at the end of the job
    parts = score_parts(store.path)
    pending = read_parts(parts)  # what ranks of a killed run scored and nobody merged yet
    _check_resume(records + [r for _, r in pending], models, store.path)
    latest = {r["path"]: r for r in records + [r for _, r in pending]}
    done = {p for p, r in latest.items() if r["status"] == "ok" or not retry_failed}
    todo = [p for p in paths if str(p.resolve()) not in done]
    summary = {"scored": 0, "failed": 0, "skipped": len(paths) - len(todo),
               "recovered_bytes": store.dropped_bytes, "out": str(store.path)}
    if store.dropped_bytes:
        print(f"{store.path}: dropped a partial last line ({store.dropped_bytes} bytes) left by an interrupted run",
              file=sys.stderr)
    missing = {str(p.resolve()) for p in todo}
    part = _Part(missing, parts_dir(store.path))  # this rank's part file, opened when the job knows its rank

    def fail(path: Path, reason: str) -> None:
        part.append({"path": str(path.resolve()), "prompt": prompt_map[path][0], "status": "failed", "reason": reason})

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
            part.append({
                **record, "scorers": described,
                "frames": int(frames.shape[0]), "height": int(frames.shape[2]), "width": int(frames.shape[3]),
                "fps": fps,
                "meta": prompt_map[path][1],
            })

    def step(chunk: list[tuple[Path, Any, float | None, str | None]]) -> None:
        """One chunk of decoded videos (a one-process run's batch): failures recorded, the rest scored."""
        batch: list[tuple[Path, Any, float | None]] = []
        for path, frames, fps, reason in chunk:
            if reason is not None:
                fail(path, reason)
                continue
            if frames.shape[0] < min_frames:
                problem = f"too short: {frames.shape[0]} frame(s); the scorers need at least {min_frames}"
            else:
                problem = _unscorable(models, frames.shape)
            if problem:
                fail(path, problem)
                continue
            if batch and (batch[0][1].shape != frames.shape or batch[0][2] != fps):
                flush(batch)
                batch = []
            batch.append((path, frames, fps))
        if batch:
            flush(batch)

    if todo:
        # The batches of an uninterrupted one-process run, whole (a batch a killed run scored part of is scored
        # again whole, its records kept): scores do not depend on the number of processes or on a kill.
        chunks = [c for c in chunked(list(range(len(paths))), batch_size)
                  if any(str(paths[i].resolve()) in missing for i in c)]
        launch = launch or Launch()

        def loader(rank: int, world: int) -> DataLoader:
            part.open(rank)
            return DataLoader(_Decoded(paths, rank_share(chunks, rank, world)), batch_size=None, collate_fn=_as_is,
                              num_workers=launch.num_workers)

        already = count_lines(parts_dir(store.path))
        bar = Progress(len(paths), len(paths) - len(todo), lambda: count_lines(parts_dir(store.path)) - already, desc="score",
                       unit="video", enabled=progress)
        ranks = run_job(launch, step, loader, bar)
        counts = ranks.gather(part.counts)
        summary["scored"] = sum(c["ok"] for c in counts)
        summary["failed"] = sum(c["failed"] for c in counts)
    parts = score_parts(store.path)
    if is_main_process() and parts:  # rank 0, once every rank's part is written
        merge_parts(store.path, parts, [str(p.resolve()) for p in paths])
    return summary


# ---------------------------------------------------------------- the ranks' part files


def _as_is(items: list) -> list:
    return items


class _Decoded(Dataset):
    """Chunk ``c`` of the videos decoded (in a DataLoader worker): per video ``(path, frames [F, C, H, W] uint8,
    fps, None)``, or ``(path, None, None, reason)`` when it cannot be read."""

    def __init__(self, paths: Sequence[Path], chunks: Sequence[Sequence[int]]):
        self.paths, self.chunks = list(paths), list(chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, c: int) -> list[tuple[Path, Any, float | None, str | None]]:
        decoded = []
        for i in self.chunks[c]:
            try:
                frames, fps = read_video_and_fps(self.paths[i])
            except VideoReadError as exc:
                decoded.append((self.paths[i], None, None, exc.reason))
                continue
            decoded.append((self.paths[i], frames, fps, None))
        return decoded


PART = re.compile(r"rank-(\d+)\.jsonl")


def parts_dir(out: Path) -> Path:
    """Where the ranks of a job write their records until rank 0 merges them into ``out``."""
    return out.parent / f"{out.name}.parts"


def score_parts(out: Path) -> list[Path]:
    directory = parts_dir(out)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if PART.fullmatch(p.name)), key=lambda p: int(PART.fullmatch(p.name)[1]))


def read_parts(parts: Sequence[Path]) -> list[tuple[bytes, dict]]:
    """Every complete line of the part files with its record, part by part (a killed writer's partial line left out)."""
    lines = []
    for path in parts:
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]
        lines += list(zip([ln + b"\n" for ln in data.split(b"\n") if ln.strip()], parse_records(data, path)))
    return lines


def count_lines(directory: Path) -> int:
    """Lines in the part files under ``directory`` (the progress of a job: one per video)."""
    total = 0
    for path in directory.glob("rank-*.jsonl"):
        with open(path, "rb") as fh:
            total += fh.read().count(b"\n")
    return total


class _Part:
    """One rank's records: appended to ``rank-<r>.jsonl`` whole and fsynced (only those of videos still missing)."""

    def __init__(self, missing: set[str], directory: Path):
        self.missing, self.directory = missing, directory
        self.file: ScoresFile | None = None
        self.counts = {"ok": 0, "failed": 0}

    def open(self, rank: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.file = ScoresFile(self.directory / f"rank-{rank}.jsonl")
        self.file.recover()  # a partial line of this rank's killed writer
        if self.file.dropped_bytes:
            print(f"{self.file.path}: dropped a partial last line ({self.file.dropped_bytes} bytes) left by an "
                  f"interrupted run", file=sys.stderr)

    def append(self, record: dict) -> None:
        if record["path"] not in self.missing:  # the rest of a batch a killed run recorded part of
            return
        self.file.append(record)
        self.counts["ok" if record["status"] == "ok" else "failed"] += 1


def merge_parts(out: Path, parts: Sequence[Path], order: Sequence[str]) -> None:
    """Append the parts' records to ``out`` in ``order`` (the sorted videos), atomically; then remove the parts.

    A line already in ``out`` (a merge killed before it removed its parts) is not appended twice.
    """
    present = set(out.read_bytes().split(b"\n")) if out.is_file() else set()
    rank_of = {path: i for i, path in enumerate(order)}
    lines = [(rank_of.get(r["path"], len(order)), n, line) for n, (line, r) in enumerate(read_parts(parts))
             if line[:-1] not in present]
    if lines:
        data = out.read_bytes() if out.is_file() else b""
        with atomic_file(out) as tmp:
            Path(tmp).write_bytes(data + b"".join(line for _, _, line in sorted(lines)))
    for path in parts:
        path.unlink(missing_ok=True)
    try:
        parts_dir(out).rmdir()
    except OSError:  # not empty: something else lives there
        pass


def backend_lines(described: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per scorer: its version (which backend) and the weight files it loaded."""
    lines = []
    for name, d in described.items():
        files = d.get("weights")
        used = ", ".join(f"{k}={v}" for k, v in files.items()) if isinstance(files, Mapping) else (files or "no weights")
        lines.append(f"  {name}: {d.get('version')} [{used}]")
    return lines
