"""``videotuna pairs``: scores.jsonl -> a preference dataset (best vs worst, re-weighted by rarity).

Writes the official VideoDPO layout (train_data.yaml, metadata.json, pair.json with ``score`` = the
pair probability) plus train_data_official.yaml (the same with an absolute META dir, for the official
loader), manifest.json (every video's dimensions, the pair weights, the parameters) and PNG plots.
Videos are ranked by the OmniScore, or by any score the records hold (``--by``, see :func:`ranking_score`).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from videotuna_dpo.data.preference import OFFICIAL_CLIP_LENGTH, OFFICIAL_TRAIN_DATA, write_official_layout
from videotuna_dpo.data.scores import read_scores, record_line
from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import atomic_directory, check_writable_dir, write_json_atomic
from videotuna_dpo.pipeline import plots as figures
from videotuna_dpo.review.labels import check_identity, file_sha256, pair_key, read_labels

PAIR_STRATEGIES = ("best-worst", "all-gap")
PROBABILITY_MODES = ("sqrt", "product")
DATASET_ENTRIES = ("train_data.yaml", OFFICIAL_TRAIN_DATA, "pairs", "plots", "summary.json")  # what a rerun replaces


def bin_probabilities(scores: Sequence[float], all_scores: Sequence[float], bin_width: float = 0.01) -> np.ndarray:
    """Each score's bin frequency in the histogram of ``all_scores`` (bins ``[k w, (k+1) w)``)."""
    if bin_width <= 0:
        raise ValueError(f"bin_width must be positive, got {bin_width}")
    all_bins = np.floor(np.asarray(all_scores, dtype=np.float64) / bin_width + 1e-9).astype(np.int64)
    values, counts = np.unique(all_bins, return_counts=True)
    freq = dict(zip(values.tolist(), (counts / len(all_bins)).tolist()))
    bins = np.floor(np.asarray(scores, dtype=np.float64) / bin_width + 1e-9).astype(np.int64)
    missing = [float(s) for s, b in zip(scores, bins) if int(b) not in freq]
    if missing:
        raise ValueError(f"scores {missing[:5]} are not among all_scores")
    return np.array([freq[int(b)] for b in bins], dtype=np.float64)


def pair_probabilities(scores_w, scores_l, all_scores, bin_width: float = 0.01, mode: str = "sqrt") -> np.ndarray:
    """Pair probability from the two videos' bin probabilities: sqrt(p_w p_l) or p_w p_l."""
    if mode not in PROBABILITY_MODES:
        raise ValueError(f"mode must be one of {', '.join(PROBABILITY_MODES)}, got {mode!r}")
    p_w = bin_probabilities(scores_w, all_scores, bin_width)
    p_l = bin_probabilities(scores_l, all_scores, bin_width)
    return np.sqrt(p_w * p_l) if mode == "sqrt" else p_w * p_l


def pair_weights(scores_w, scores_l, all_scores, alpha, beta=0.72, bin_width=0.01, mode="sqrt") -> np.ndarray:
    """VideoDPO re-weighting: ``(beta / p) ** alpha`` with p the pair probability; alpha = 0 gives ones."""
    p = pair_probabilities(scores_w, scores_l, all_scores, bin_width, mode)
    return (beta / p) ** alpha


ORIGINS = ("scorer", "human-confirmed", "human-flipped")  # who chose a pair's winner (manifest "origin")


GROUP_SCORES = ("omniscore", "quality", "semantic")  # the aggregates of a score record; other names are raw scores


def ranking_score(record: dict, by: str = "omniscore") -> Any:
    """The score pairs are ranked by: the record's ``omniscore``, ``quality`` or ``semantic``, else the raw score
    of the scorer named ``by`` (None when the record has none)."""
    if by in GROUP_SCORES:
        return record.get(by)
    return (record.get("raw") or {}).get(by)


def recorded_scores(record: dict) -> list[str]:
    """The names ``--by`` accepts for this record."""
    return [g for g in GROUP_SCORES if record.get(g) is not None] + list(record.get("raw") or {})


@dataclass
class Pair:
    prompt: str
    winner: dict
    loser: dict
    origin: str = "scorer"
    by: str = "omniscore"  # the score that ranked them

    @property
    def gap(self) -> float:
        return ranking_score(self.winner, self.by) - ranking_score(self.loser, self.by)


def group_key(record: dict) -> str:
    """The prompt entry a video was sampled for: its generation record's prompt id, else its prompt text.

    A prompts file that lists one caption several times gives one group (best vs worst) per entry.
    """
    meta = record.get("meta") or {}
    return f"id:{meta['prompt_id']}" if meta.get("prompt_id") else f"text:{record['prompt']}"


def select_pairs(records: list[dict], strategy: str = "best-worst", min_gap: float = 0.0,
                 by: str = "omniscore") -> tuple[list[Pair], dict]:
    """Group scored videos by prompt and pair them by the score ``by`` (:func:`ranking_score`); ties are never
    pairs. Returns pairs and counts."""
    if strategy not in PAIR_STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(PAIR_STRATEGIES)}, got {strategy!r}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[group_key(r)].append(r)
    pairs: list[Pair] = []
    stats = {"prompts": len(groups), "prompts_without_pair": 0}
    for group in groups.values():
        prompt = group[0]["prompt"]
        group = sorted(group, key=lambda r: (-ranking_score(r, by), r["path"]))
        found = []
        if strategy == "best-worst":
            best, worst = group[0], group[-1]
            if len(group) >= 2 and ranking_score(best, by) - ranking_score(worst, by) > max(min_gap, 0.0):
                found.append(Pair(prompt, best, worst, by=by))
        else:
            for i, w in enumerate(group):
                for l in group[i + 1 :]:
                    if ranking_score(w, by) - ranking_score(l, by) > max(min_gap, 0.0):
                        found.append(Pair(prompt, w, l, by=by))
        if not found:
            stats["prompts_without_pair"] += 1
        pairs.extend(found)
    return pairs, stats


def apply_labels(pairs: list[Pair], records: list[dict], labels_path: str | Path,
                 scores_path: str | Path) -> tuple[list[Pair], dict]:
    """Apply a person's labels (``videotuna review``) to scorer-chosen pairs; returns the pairs left and a report.

    keep: the pair stays, ``origin`` human-confirmed; flip: winner and loser swap, human-flipped; tie: the pair is
    dropped; reject: the pair and every other pair of its broken video(s) are dropped. ``records`` are every
    video of scores.jsonl: a label naming another video, or one whose file changed since it was labelled, is refused.
    A label matches a pair by its two videos whichever order the scorer gave them now.
    """
    labels = read_labels(labels_path, "pairs")
    check_identity(labels, {r["path"]: r["path"] for r in records}, str(scores_path))
    by_pair = {pair_key(label): label for label in labels.labels}
    broken = {}
    for label in labels.labels:
        for ref in label.broken_refs:
            broken.setdefault(ref.path, label)
    kept: list[Pair] = []
    dropped: list[dict] = []
    applied: set[int] = set()
    for pair in pairs:
        videos = (pair.winner["path"], pair.loser["path"])
        label = by_pair.get(frozenset(videos))
        bad = [path for path in videos if path in broken]
        row = {"winner": videos[0], "loser": videos[1], "prompt": pair.prompt}
        if bad:  # a reject wins over any other label of the pair
            applied.update([broken[bad[0]].index] + ([label.index] if label is not None else []))
            dropped.append({**row, "reason": f"reject: {bad[0]} is broken (labels[{broken[bad[0]].index}])"})
            continue
        if label is None:
            kept.append(pair)
            continue
        applied.add(label.index)
        if label.label == "tie":
            dropped.append({**row, "reason": f"tie (labels[{label.index}])"})
        elif label.preferred.path == pair.winner["path"]:
            kept.append(Pair(pair.prompt, pair.winner, pair.loser, "human-confirmed", pair.by))
        else:
            kept.append(Pair(pair.prompt, pair.loser, pair.winner, "human-flipped", pair.by))
    report = {
        "file": str(Path(labels_path).resolve()), "sha256": file_sha256(labels_path), "labels": len(labels.labels),
        "confirmed": sum(p.origin == "human-confirmed" for p in kept),
        "flipped": sum(p.origin == "human-flipped" for p in kept),
        "dropped_tie": sum(d["reason"].startswith("tie") for d in dropped),
        "dropped_reject": sum(d["reason"].startswith("reject") for d in dropped),
        "rejected_videos": sorted(broken),
        "not_applied": [i for i in range(len(labels.labels)) if i not in applied],
        "dropped_pairs": dropped,
    }
    return kept, report


def read_scored(scores_path: str | Path, by: str = "omniscore") -> tuple[list[dict], list[dict]]:
    """The ``ok`` and the ``failed`` records of a scores.jsonl (last record per video); each ``ok`` one must hold
    a finite score ``by`` (:func:`ranking_score`)."""
    records = list(read_scores(scores_path).values())
    ok, failed = [], []
    for r in records:
        if r.get("status") != "ok":
            failed.append(r)
            continue
        s = ranking_score(r, by)
        if s is None:
            raise UserError(f"{scores_path}: record for {r['path']} has no {by} score; it records "
                            f"{', '.join(recorded_scores(r)) or 'none'}: pair by one of them with --by NAME")
        if not isinstance(s, (int, float)) or not math.isfinite(s):
            raise UserError(f"{scores_path}: record for {r['path']} has a non-finite {by} {s!r}")
        _check_dimensions(r, scores_path)
        if not r.get("prompt"):
            raise UserError(f"{scores_path}: record for {r['path']} has no prompt")
        ok.append(r)
    return ok, failed


def _check_dimensions(record: dict, scores_path: str | Path) -> None:
    """Refuse a NaN or infinite dimension (raw, normalised, quality, semantic), naming its scores.jsonl line."""
    values = {**{f"raw dimension {k!r}": v for k, v in (record.get("raw") or {}).items()},
              **{f"normalized dimension {k!r}": v for k, v in (record.get("normalized") or {}).items()},
              "quality": record.get("quality"), "semantic": record.get("semantic")}
    for what, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{scores_path}:{record_line(scores_path, record['path'])}: {what} of {record['path']} "
                            f"is {value}; rescore that video or remove its line")


def clip_duration(record: dict) -> float:
    """Seconds of a scored video: frames / fps, the fps its generation record sampled at, else the file's, else 8."""
    fps = ((record.get("meta") or {}).get("sampler") or {}).get("fps") or record.get("fps") or 8
    return record.get("frames", 0) / fps


def short_clip_warning(summary: dict) -> str | None:
    """The one warning for videos the official loader would drop (under its clip_length, 1.0 s), or None."""
    n = summary.get("short_clips", 0)
    if not n:
        return None
    return (f"warning: {n} of {summary['videos']} videos are shorter than {OFFICIAL_CLIP_LENGTH:g} s (clip_duration = "
            f"frames / fps in pairs/metadata.json). The official VideoDPO loader drops every clip shorter than its "
            f"clip_length ({OFFICIAL_CLIP_LENGTH:g} s by default) before it indexes pair.json, so its pairs would point "
            f"at other videos: give it clip_length: 0 (data.params.train.params in its config). This package reads "
            f"every clip whatever its duration.")


def check_pair_settings(min_gap: float, alpha: float, beta: float, bin_width: float, mode: str) -> None:
    """Refuse settings that would give no weights or meaningless ones, naming the option."""
    rules = [("--min-gap", min_gap, min_gap >= 0, ">= 0"), ("--alpha", alpha, alpha >= 0, ">= 0 (0 = plain DPO)"),
             ("--beta", beta, beta > 0, "> 0"), ("--bin-width", bin_width, bin_width > 0, "> 0")]
    problems = [f"{flag} must be a finite number {rule}, got {value}"
                for flag, value, ok, rule in rules if not (ok and math.isfinite(value))]
    if mode not in PROBABILITY_MODES:
        problems.append(f"--mode must be one of {', '.join(PROBABILITY_MODES)}, got {mode!r}")
    if problems:
        raise UserError("; ".join(problems))


def _check_replaceable(out: Path) -> None:
    """``out`` is replaced as a whole: refuse one that holds anything but a pairs dataset."""
    # The new dataset is staged next to out, then swapped in: out's parent must be writable.
    check_writable_dir(out.parent if out.is_dir() else out, f"--out {out}")
    other = sorted(p.name for p in out.iterdir() if p.name not in DATASET_ENTRIES) if out.is_dir() else []
    if other:
        raise UserError(f"--out {out} holds {', '.join(other[:5])}, which is not part of a pairs dataset and would be "
                        f"replaced with it; write the dataset to a new or empty directory")


def build_pairs_dataset(
    scores_path: str | Path,
    out: str | Path,
    strategy: str = "best-worst",
    min_gap: float = 0.0,
    alpha: float = 1.0,
    beta: float = 0.72,
    bin_width: float = 0.01,
    mode: str = "sqrt",
    plots: bool = True,
    labels: str | Path | None = None,
    by: str = "omniscore",
    max_motion_drop: float | None = None,
) -> dict[str, Any]:
    """Pair, weight and write a dataset; returns a summary (counts, weight range, paths).

    ``by``: the score that ranks a prompt's videos and whose histogram re-weights the pairs (:func:`ranking_score`):
    the OmniScore by default, or any score the records hold; the manifest's ``ranked_by`` says which.

    ``labels``: a labels.json of ``videotuna review`` to apply to the scorer's pairs (:func:`apply_labels`).
    ``max_motion_drop``: the motion guard (``--motion-guard``); pairs whose winner moves more than this fraction
    less than its loser are refused (:func:`videotuna_dpo.pipeline.guards.motion_guard_pairs`).

    Everything is checked first and the dataset is built next to ``out``, then swapped in: ``out`` ends up
    the new dataset or, on any failure, stays the old one.
    """
    out = Path(out)
    check_pair_settings(min_gap, alpha, beta, bin_width, mode)
    _check_replaceable(out)
    ok, failed = read_scored(scores_path, by)
    if not ok:
        raise UserError(f"{scores_path}: no successfully scored videos")
    pairs, stats = select_pairs(ok, strategy, min_gap, by)
    if not pairs:
        raise UserError(f"{scores_path}: no pairs (every prompt's samples tie or differ by <= {min_gap})")
    label_report = None
    if labels is not None:
        pairs, label_report = apply_labels(pairs, ok + failed, labels, scores_path)
        if not pairs:
            raise UserError(f"--labels {labels}: every pair of {scores_path} is dropped by a tie or a reject")
    motion_report = None
    if max_motion_drop is not None:
        from videotuna_dpo.pipeline.guards import motion_guard_pairs

        pairs, motion_report = motion_guard_pairs(pairs, max_motion_drop, scores_path)
        if not pairs:
            raise UserError(f"--motion-guard: every pair of {scores_path} has a winner that moves more than "
                            f"{max_motion_drop:g} less than its loser; raise --max-motion-drop")
    all_scores = [ranking_score(r, by) for r in ok]
    s_w = [ranking_score(p.winner, by) for p in pairs]
    s_l = [ranking_score(p.loser, by) for p in pairs]
    probability = pair_probabilities(s_w, s_l, all_scores, bin_width, mode)
    weights = (beta / probability) ** alpha
    if not np.isfinite(weights).all():
        raise UserError(f"--alpha {alpha}: the weight (beta / p) ** alpha of the rarest pair overflows; "
                        f"use a smaller --alpha")

    # Clip paths are relative to where the dataset will be, not to its staging dir, and to its real path: a reader
    # follows `..` from the directory the META dir really is in, whatever symlinked path named it.
    absolute = Path(os.path.abspath(out))
    final = Path(os.path.realpath(absolute.parent)) / absolute.name
    meta_dir = final / "pairs"
    index: dict[str, int] = {}
    clips, videos = [], []
    for r in (v for p in pairs for v in (p.winner, p.loser)):
        if r["path"] in index:
            continue
        index[r["path"]] = len(clips)
        meta = r.get("meta") or {}
        video = os.path.abspath(r["path"])
        video = os.path.join(os.path.realpath(os.path.dirname(video)), os.path.basename(video))
        clips.append({"clip_path": os.path.relpath(video, meta_dir), "caption": r["prompt"],
                      "duration": clip_duration(r)})
        videos.append({"clip_path": clips[-1]["clip_path"], "path": r["path"], "prompt": r["prompt"],
                       "omniscore": r.get("omniscore"), "quality": r.get("quality"), "semantic": r.get("semantic"),
                       "raw": r.get("raw", {}), "normalized": r.get("normalized", {}),
                       "seed": meta.get("seed"), "model": meta.get("model")})
    rows = [{"winner": index[p.winner["path"]], "loser": index[p.loser["path"]], "caption": p.prompt,
             "score": float(prob)} for p, prob in zip(pairs, probability)]
    manifest = {
        "source_scores": str(Path(scores_path).resolve()),
        "strategy": strategy, "min_gap": min_gap, "ranked_by": by,
        "reweighting": {"alpha": alpha, "beta": beta, "bin_width": bin_width, "mode": mode,
                        "formula": "weight = (beta / p) ** alpha, p = " + ("sqrt(p_w * p_l)" if mode == "sqrt" else "p_w * p_l")},
        "videos": videos,
        "pairs": [{"winner": row["winner"], "loser": row["loser"], "prompt": p.prompt, "gap": p.gap,
                   "probability": float(prob), "weight": float(w), "origin": p.origin}
                  for row, p, prob, w in zip(rows, pairs, probability, weights)],
        "failed_videos": [{"path": r["path"], "reason": r.get("reason", "")} for r in failed],
        "labels": label_report,
        "motion_guard": motion_report,
    }
    summary = {
        "train_data": str(out / "train_data.yaml"), "official_train_data": str(final / OFFICIAL_TRAIN_DATA),
        "pairs": len(pairs), "ranked_by": by, "videos": len(clips), "scored": len(ok),
        "failed_videos_left_out": len(failed), **stats,
        "short_clips": sum(c["duration"] < OFFICIAL_CLIP_LENGTH for c in clips),
        "weight_min": float(weights.min()), "weight_max": float(weights.max()), "weight_mean": float(weights.mean()),
    }
    if motion_report is not None:
        summary["motion_refused"] = len(motion_report["refused"])
    if label_report is not None:
        summary["labels"] = {k: v for k, v in label_report.items() if k != "dropped_pairs"}
    with atomic_directory(out) as tmp:
        write_official_layout(tmp / meta_dir.name, clips, rows, manifest, final_meta_dir=meta_dir)
        if plots:
            drawn = figures.pair_plots(tmp / "plots", ok, pairs, weights, all_scores, by)
            summary["plots"] = {name: str(out / Path(png).relative_to(tmp)) for name, png in drawn.items()}
        write_json_atomic(tmp / "summary.json", summary)
    return summary
