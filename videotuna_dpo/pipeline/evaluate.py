"""``videotuna eval``: base vs tuned weights on the same prompts and seeds, scored and compared.

Samples go to ``OUT/samples/<label>/`` (``base`` and one label per weight set), scores to
``OUT/scores/<label>.jsonl``; both steps resume, so a rerun only does what is missing. Per dimension
the table holds the base and tuned means over paired videos, the delta, the win rate and a paired
z-score. :class:`videotuna_dpo.eval_callback.EvalCallback` logs the same OmniScore during DPO training.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from videotuna_dpo.config import plain, validate
from videotuna_dpo.data.scores import read_scores, record_values
from videotuna_dpo.errors import UserError
from videotuna_dpo.eval_callback import eval_settings, measured_apart
from videotuna_dpo.fileio import check_writable_dir
from videotuna_dpo.pipeline.generate import generate_videos
from videotuna_dpo.jobs import Launch, is_main_process
from videotuna_dpo.pipeline.report import write_report
from videotuna_dpo.pipeline.score import score_videos
from videotuna_dpo.sampling import GenerateSchema
from videotuna_dpo.pipeline.guards import check_table
from videotuna_dpo.scoring.omniscore import NO_WEIGHTS_DIMENSIONS
from videotuna_dpo.user_files import read_json

BASE = "base"
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# ---------------------------------------------------------------- comparing two scores files


def pair_key(record: Mapping[str, Any]) -> str:
    """``<prompt_id>_s<sample>`` from the generation record in ``meta``, else the video's file stem."""
    meta = record.get("meta") or {}
    if "prompt_id" in meta and "sample" in meta:
        return f"{meta['prompt_id']}_s{meta['sample']}"
    return Path(record["path"]).stem


def _ok_records(path: Path) -> tuple[dict[str, dict], int]:
    records = read_scores(path)
    ok: dict[str, dict] = {}
    for record in records.values():
        if record.get("status") != "ok":
            continue
        if record.get("omniscore") is None:
            raise UserError(f"{path}: the record of {record['path']} has no OmniScore (none of its scorers "
                            f"{', '.join(record.get('raw') or {})} is an OmniScore dimension); eval compares "
                            f"OmniScores: add a dimension to --scorers (or eval.scorers)")
        key = pair_key(record)
        if key in ok:
            raise UserError(f"{path}: two scored videos share the pairing key {key!r} "
                            f"({ok[key]['path']} and {record['path']}); score each sample directory separately")
        ok[key] = record
    return ok, sum(1 for r in records.values() if r.get("status") != "ok")


def paired_z(diffs: Sequence[float]) -> float | None:
    """mean(d) / (std(d, ddof=1) / sqrt(n)); +-inf when every difference is the same non-zero value,
    0 when they are all zero, None with fewer than two pairs."""
    n = len(diffs)
    if n < 2:
        return None
    mean = math.fsum(diffs) / n
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    if std <= 1e-12 * max(abs(d) for d in diffs):  # equal differences, up to rounding of the mean
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / (std / math.sqrt(n))


def _row(dimension: str, pairs: list[tuple[float, float]]) -> dict:
    n = len(pairs)
    base = sum(b for b, _ in pairs) / n
    tuned = sum(t for _, t in pairs) / n
    wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for b, t in pairs)
    return {"dimension": dimension, "base": base, "tuned": tuned, "delta": tuned - base, "win_rate": wins / n,
            "z": paired_z([t - b for b, t in pairs]), "n": n}


def _row_order(name: str) -> tuple[int, str]:
    order = {"omniscore": 0, "quality": 1, "semantic": 2}
    if name in order:
        return order[name], name
    return (3 if name.startswith("normalized/") else 4), name


def compare_scores(base_jsonl: str | Path, tuned_jsonl: str | Path) -> dict:
    """Pair the "ok" videos of two scores files by prompt_id+sample (or file stem) -> the comparison table.

    Rows (omniscore, quality, semantic, normalized/X, raw/X) hold base and tuned means over the
    pairs, delta, win rate (tuned > base; ties count half) and the paired z-score.
    """
    base_path, tuned_path = Path(base_jsonl), Path(tuned_jsonl)
    base, base_failed = _ok_records(base_path)
    tuned, tuned_failed = _ok_records(tuned_path)
    keys = [k for k in sorted(base) if k in tuned]
    if not keys:
        raise UserError(
            f"no video of {tuned_path} pairs with one of {base_path} ({len(tuned)} and {len(base)} scored videos): "
            f"videos pair by the prompt_id and sample of their generation record, else by file name; generate "
            f"both with the same prompts file, --num-samples and --seed"
        )
    paired, columns = [], {}
    for key in keys:
        b, t = base[key], tuned[key]
        bm, tm = b.get("meta") or {}, t.get("meta") or {}
        if "seed" in bm and "seed" in tm and bm["seed"] != tm["seed"]:
            raise UserError(f"{key}: seed {bm['seed']} in {base_path} but {tm['seed']} in {tuned_path}; a paired "
                            f"comparison needs the same seeds (same --seed and --num-samples)")
        if b.get("prompt") != t.get("prompt"):
            raise UserError(f"{key}: prompt {b.get('prompt')!r} in {base_path} but {t.get('prompt')!r} in {tuned_path}")
        bv, tv = record_values(b), record_values(t)
        for name in bv.keys() & tv.keys():
            columns.setdefault(name, []).append((bv[name], tv[name]))
        paired.append({"key": key, "prompt": b.get("prompt"), "seed": bm.get("seed", tm.get("seed")),
                       "base_path": b["path"], "tuned_path": t["path"],
                       "base": b["omniscore"], "tuned": t["omniscore"], "diff": t["omniscore"] - b["omniscore"]})
    return {
        "base_scores": str(base_path),
        "tuned_scores": str(tuned_path),
        "pairs": len(keys),
        "unpaired": {"base": len(base) - len(keys), "tuned": len(tuned) - len(keys)},
        "failed": {"base": base_failed, "tuned": tuned_failed},
        "rows": [_row(name, columns[name]) for name in sorted(columns, key=_row_order)],
        "paired": paired,
    }


def table_row(table: Mapping[str, Any], dimension: str = "omniscore") -> dict:
    """The row of ``dimension`` in a :func:`compare_scores` table."""
    for row in table["rows"]:
        if row["dimension"] == dimension:
            return row
    raise KeyError(f"no row {dimension!r}; rows: {', '.join(r['dimension'] for r in table['rows'])}")


# ---------------------------------------------------------------- the evaluation run


def resolve_weights(spec: str | Path) -> Path:
    """A weights dir (holds trainable.json) as is, a run dir as its ``weights/last``."""
    path = Path(spec)
    if (path / "trainable.json").is_file():
        return path
    if (path / "weights" / "last" / "trainable.json").is_file():
        return path / "weights" / "last"
    raise UserError(
        f"--weights {path}: neither a weights directory (with trainable.json) nor a run directory with "
        f"weights/last/trainable.json (if this is a key=value override, put it before --weights)"
    )


def weight_labels(weights: Sequence[Path]) -> list[str]:
    """Short unique labels: the run dir's name (plus the step for weights/step-N), never ``base``."""
    labels: list[str] = []
    for w in weights:
        if w.parent.name == "weights":
            label = w.parent.parent.name + ("" if w.name == "last" else f"-{w.name}")
        else:
            label = w.name
        label = _SAFE.sub("_", label) or "tuned"
        unique, i = label, 2
        while unique == BASE or unique in labels:
            unique, i = f"{label}-{i}", i + 1
        labels.append(unique)
    return labels


def _check_samples(directory: Path, weights: str | None, sampler: Mapping[str, Any]) -> None:
    """Refuse to resume into a sample directory made with other weights or sampler settings."""
    for record_file in sorted(directory.glob("*_s*.json"))[:1]:
        record = read_json(record_file)
        made = (record.get("model") or {}).get("weights")
        if made != weights:
            raise UserError(f"{record_file}: these samples were made with weights {made!r}, this run asks for "
                            f"{weights!r}; use another --out (or delete {directory})")
        before = {k: v for k, v in (record.get("sampler") or {}).items() if k in sampler}
        changed = {k: (before.get(k), v) for k, v in sampler.items() if before.get(k) != v}
        if changed:
            raise UserError(f"{record_file}: these samples were made with other generate settings "
                            f"({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())}); "
                            f"use another --out (or delete {directory})")


def evaluate(
    cfg: Any,
    registry: Any,
    prompts_file: str | Path,
    weights: Sequence[str | Path],
    num_samples: int,
    out: str | Path,
    seed: int = 1000,
    scorers: Sequence[str] | None = None,
    scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
    source: str = "<config>",
    progress: bool = True,
    launch: Launch | None = None,
) -> dict:
    """Generate and score base and each weight set with the same prompts and seeds; write the report.

    Returns ``{"tables": {label: table}, "counts", "settings", "report": {name: path}}``; on several processes
    (``launch``) every rank generates and scores its share, and rank 0 alone compares and reports (the other
    ranks return ``{}``).
    """
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    check_writable_dir(out, f"--out {out}")  # before any model loads
    if cfg.model.get("trainable_weights"):
        raise UserError(f"{source}: model.trainable_weights is set ({cfg.model.trainable_weights}), so the base would "
                        f"not be the pretrained model; remove it and pass those weights with --weights")
    settings = eval_settings(cfg, source)
    names = list(scorers or settings.scorers or NO_WEIGHTS_DIMENSIONS)
    judges = [str(j) for j in settings.judges]
    # Judges and the motion measures are scored with the rest but never join the OmniScore (weight 0).
    measured = measured_apart(names, judges, f"{source}: eval.judges")
    options = {k: dict(v) for k, v in (scorer_options or plain(settings.options) or {}).items()}
    omni_weights = {k: float(v) for k, v in settings.weights.items()}
    omni_weights.update({n: 0.0 for n in measured if _is_dimension(n, registry)})
    resolved = [resolve_weights(w) for w in weights]
    runs: dict[str, str | None] = {BASE: None}
    runs.update({label: str(w.resolve()) for label, w in zip(weight_labels(resolved), resolved)})

    gen_settings = validate(cfg.get("generate"), GenerateSchema, "generate", source)
    sampler = {k: gen_settings[k] for k in ("num_frames", "steps", "guidance", "height", "width", "fps", "negative_prompt")}
    if gen_settings.guidance_2 is not None:
        sampler["guidance_2"] = gen_settings.guidance_2
    out = Path(out)
    counts: dict[str, dict] = {}
    for label, weights_dir in runs.items():
        samples = out / "samples" / label
        if samples.is_dir():
            _check_samples(samples, weights_dir, sampler)
        gen = generate_videos(cfg, registry, prompts_file, samples, num_samples=num_samples, seed=seed,
                              weights=weights_dir, source=source, launch=launch, progress=progress)
        scored = score_videos(samples, out / "scores" / f"{label}.jsonl", scorers=names + measured,
                              batch_size=settings.score_batch_size, options=options, weights=omni_weights,
                              progress=progress, registry=registry, launch=launch)
        if not is_main_process():
            continue
        counts[label] = {"videos": gen["total"], "generated": gen["generated"], "kept": gen["kept"],
                         "scored": scored["scored"], "failed": scored["failed"], "skipped": scored["skipped"]}
        _check_measured_apart(out / "scores" / f"{label}.jsonl", measured)
    if not is_main_process():
        return {}
    tables = {label: compare_scores(out / "scores" / f"{BASE}.jsonl", out / "scores" / f"{label}.jsonl")
              for label in runs if label != BASE}
    for label, table in tables.items():
        table["guards"] = check_table(table, judges, label, BASE)
    summary = {
        "settings": {
            "config": source, "prompts": str(prompts_file), "num_samples": num_samples, "seed": seed,
            "seeds": f"video k of prompt i uses seed + i*{num_samples} + k, the same for every model",
            "scorers": names, "judges": judges, "measured": measured,
            "scorer_options": options, "omniscore_weights": omni_weights,
            "model": {"name": str(cfg.model.name), "pretrained": str(cfg.model.get("pretrained", ""))},
            "generate": plain(gen_settings), "weights": runs,
        },
        "counts": counts,
        "tables": tables,
    }
    summary["report"] = write_report(out, summary)
    return summary


def _is_dimension(name: str, registry: Any) -> bool:
    """Whether scorer ``name`` would join the OmniScore: a VBench dimension, or a scorer declaring a range."""
    from videotuna_dpo.scoring.omniscore import RANGES

    return name in RANGES or getattr(registry.get("scorer", name), "score_range", None) is not None


def _check_measured_apart(scores: Path, measured: Sequence[str]) -> None:
    """Refuse scores where a judge or motion measure joined the OmniScore (its weight 0 did not reach it)."""
    for record in read_scores(scores).values():
        joined = [n for n in record.get("dimensions_used") or () if n in measured]
        if joined:
            raise UserError(f"{scores}: {', '.join(joined)} joined the OmniScore of {record['path']}, but judges and "
                            f"motion measures must stay out of it; score with eval.weights.{joined[0]}: 0")

