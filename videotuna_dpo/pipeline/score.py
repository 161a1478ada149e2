"""``videotuna score``: videos -> scores.jsonl, one OmniScore record per video, resumable.

Each line is appended whole and fsynced; a trailing partial line (a killed run) is dropped on the
next start, videos already in the file are skipped, and unreadable or too-short videos are written
as ``"status": "failed"`` lines with the reason, never scored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import check_writable_file, is_temporary
from videotuna_dpo.scoring.omniscore import DIMENSIONS, NO_WEIGHTS_DIMENSIONS
from videotuna_dpo.user_files import read_bounded, read_json

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


# ---------------------------------------------------------------- the output file


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


# ---------------------------------------------------------------- scoring


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_options(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["aesthetic_quality.clip_weights=/w/ViT-L-14.pt", ...]`` -> ``{scorer: {key: value}}``."""
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        scorer, dot, option = key.partition(".")
        if not sep or not dot or not scorer or not option:
            raise UserError(f"--option {item!r}: expected SCORER.KEY=VALUE, e.g. dynamic_degree.fps=16")
        options.setdefault(scorer, {})[option] = _parse_value(value)
    return options


def parse_weights(items: Iterable[str]) -> dict[str, float]:
    """``["dynamic_degree=0.5"]`` -> ``{"dynamic_degree": 0.5}``."""
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"--weight {item!r}: expected DIMENSION=NUMBER, e.g. dynamic_degree=0.5") from None
        if not sep or weights[name] < 0:
            raise UserError(f"--weight {item!r}: expected DIMENSION=NUMBER >= 0")
    return weights


def build_scorers(names: Sequence[str], device: str, options: Mapping[str, Mapping[str, Any]], registry=None) -> dict:
    """Create every named scorer; all missing-weights problems are reported together."""
    from videotuna_dpo.registry import Registry, call_with_optional
    from videotuna_dpo.scoring.base import MissingWeightsError, Scorer

    registry = registry or Registry.load()
    unknown_opts = sorted(set(options) - set(names))
    if unknown_opts:
        raise UserError(f"--option given for scorer(s) not being run: {', '.join(unknown_opts)}; running: {', '.join(names)}")
    scorers, problems = {}, []
    for name in names:
        factory = registry.get("scorer", name)
        kwargs = dict(options.get(name, {}))
        optional = {} if "device" in kwargs else {"device": device}  # an explicit --option NAME.device wins
        try:
            scorer = call_with_optional(partial(factory, **kwargs), **optional)
        except MissingWeightsError as exc:
            problems.append(str(exc))
            continue
        except TypeError as exc:
            raise UserError(f"scorer {name}: bad options {sorted(kwargs)}: {exc}") from exc
        if not isinstance(scorer, Scorer) or scorer.kind not in ("quality", "semantic"):
            raise UserError(
                f"scorer {name} ({type(scorer).__module__}.{type(scorer).__qualname__}) does not follow the scorer "
                f"contract: it needs kind ('quality'/'semantic'), needs_weights, weights_hint, version and __call__"
            )
        scorers[name] = scorer
    if problems:
        raise UserError(
            "missing scorer weights:\n  " + "\n  ".join(problems)
            + f"\nOr score only the dimensions that need no weights: --scorers {','.join(NO_WEIGHTS_DIMENSIONS)}"
        )
    return scorers


def omniscore_config(models: Mapping[str, Any], weights: Mapping[str, float] | None = None):
    """The OmniScore settings for these scorers: kinds, plus ranges of plugin dimensions that declare one."""
    from videotuna_dpo.scoring.omniscore import OmniScoreConfig

    config = OmniScoreConfig()
    for name, scorer in models.items():
        config.kinds.setdefault(name, scorer.kind)
        if getattr(scorer, "score_range", None) is not None:  # a plugin dimension joining the OmniScore
            config.ranges.setdefault(name, tuple(scorer.score_range))
            config.weights.setdefault(name, float(getattr(scorer, "score_weight", 1.0)))
    return config.with_weights(weights or {})


def _describe(scorer) -> dict:
    if hasattr(scorer, "describe"):
        return scorer.describe()
    return {"version": str(scorer.version), "weights": scorer.weights_hint or None}


def call_scorer(scorer: Any, clip: Any, texts: list[str], fps: float | None) -> Any:
    """Score a batch; scorers that declare ``uses_fps`` also get the files' frame rate."""
    if getattr(scorer, "uses_fps", False):
        return scorer(clip, texts, fps=fps)
    return scorer(clip, texts)


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
    import torch
    from tqdm import tqdm

    from videotuna_dpo.data.video_io import VideoReadError, read_video_and_fps
    from videotuna_dpo.scoring.base import default_device
    from videotuna_dpo.scoring.omniscore import omniscore, omniscore_dimensions

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
    described = {name: _describe(s) for name, s in models.items()}
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
        clip = torch.stack([frames for _, frames, _ in batch]).to(device).float().div_(255.0)  # [B, F, C, H, W]
        texts = [prompt_map[p][0] for p, _, _ in batch]
        fps = batch[0][2]  # one rate per batch
        raw = {name: call_scorer(scorer, clip, texts, fps).detach().double().cpu().reshape(len(batch))
               for name, scorer in models.items()}
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


# ---------------------------------------------------------------- CLI

EXAMPLE = (
    "example: videotuna score --videos samples/ --prompts samples/prompts.json --out scores.jsonl "
    f"--scorers {','.join(NO_WEIGHTS_DIMENSIONS)} --batch-size 4"
)
DESCRIPTION = """\
Score every video on VBench dimensions and their OmniScore; one JSON line per video in --out.
A rerun skips videos already in --out; unreadable or too-short videos become "failed" lines.

prompts: --prompts FILE as .json {"a.mp4" (path, file name or stem): "prompt", ...} or a list of
{"path": ..., "prompt": ...}, .jsonl of those, or .txt with one prompt per sorted video; without it,
a sidecar <video>.json (a.mp4.json or a.json) with a "prompt" key, as `videotuna generate` writes.

weights: model-based scorers (subject_consistency, aesthetic_quality, overall_consistency; MUSIQ,
RAFT and AMT options) read local files from $VIDEOTUNA_WEIGHTS or --option SCORER.KEY=PATH:
  $VIDEOTUNA_WEIGHTS/dino/dino_vitbase16_pretrain.pth        subject_consistency  (weights=)
  $VIDEOTUNA_WEIGHTS/clip/ViT-L-14.pt                        aesthetic_quality; overall_consistency without ViCLIP (clip_weights=)
  $VIDEOTUNA_WEIGHTS/viclip/ViClip-InternVid-10M-FLT.pth     overall_consistency as VBench, used when present (viclip_weights=)
  $VIDEOTUNA_WEIGHTS/aesthetic/sa_0_4_vit_l_14_linear.pth    aesthetic_quality    (head_weights=)
  $VIDEOTUNA_WEIGHTS/musiq/musiq_spaq_ckpt-358bb6af.pth      imaging_quality, else a NIQE proxy (musiq_weights=)
  $VIDEOTUNA_WEIGHTS/raft/raft_large_C_T_V2-1bb1363a.pth     dynamic_degree/motion_smoothness flow=raft (raft_weights=);
    or VBench's RAFT raft/raft_model.pth (= raft-things.pth, princeton-vl layout, converted on load)
  $VIDEOTUNA_WEIGHTS/amt/amt-s.pth                           motion_smoothness interpolator=amt, VBench's AMT-S (amt_weights=)
"""


def backend_lines(described: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per scorer: its version (which backend) and the weight files it loaded."""
    lines = []
    for name, d in described.items():
        files = d.get("weights")
        used = ", ".join(f"{k}={v}" for k, v in files.items()) if isinstance(files, Mapping) else (files or "no weights")
        lines.append(f"  {name}: {d.get('version')} [{used}]")
    return lines


def _cmd_score(args: argparse.Namespace) -> int:
    summary = score_videos(
        videos=args.videos,
        out=args.out,
        prompts=args.prompts,
        scorers=[s.strip() for s in args.scorers.split(",") if s.strip()] if args.scorers else None,
        batch_size=args.batch_size,
        device=args.device,
        options=parse_options(args.option),
        weights=parse_weights(args.weight),
        retry_failed=args.retry_failed,
        progress=not args.no_progress,
        announce=True,
    )
    print(
        f"scored {summary['scored']}, failed {summary['failed']}, skipped {summary['skipped']} "
        f"(already in {summary['out']})"
    )
    if summary["failed"]:
        print(f"{summary['failed']} video(s) failed; their reasons are the \"failed\" lines of {summary['out']}",
              file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``score`` verb on the ``videotuna`` subparsers."""
    p = subparsers.add_parser(
        "score",
        help="score videos on VBench dimensions -> scores.jsonl (OmniScore)",
        description=DESCRIPTION,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--videos", required=True, help="a directory of videos (recursive), a .txt list of paths, or one video")
    p.add_argument("--prompts", default=None, help="prompts file (.json, .jsonl or .txt); default: <video>.json sidecars")
    p.add_argument("--out", required=True, help="the JSONL file to append to (resumed if it exists)")
    p.add_argument("--scorers", default=None,
                   help=f"comma-separated scorer names (default: all seven: {','.join(DEFAULT_SCORERS)})")
    p.add_argument("--batch-size", type=int, default=4, help="videos per batch (default 4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--option", action="append", default=[], metavar="SCORER.KEY=VALUE",
                   help="a scorer option, e.g. dynamic_degree.fps=16 or aesthetic_quality.clip_weights=PATH (repeatable)")
    p.add_argument("--weight", action="append", default=[], metavar="DIMENSION=W",
                   help="OmniScore weight of a dimension, e.g. dynamic_degree=0.5 (repeatable; 0 leaves it out)")
    p.add_argument("--retry-failed", action="store_true", help="score again the videos recorded as failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_score)
    return p
