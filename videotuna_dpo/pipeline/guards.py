"""Guards against reward hacking: judges the training never used, and motion that tuning lost.

Training on a scorer invites gaming it: DPO drifts toward low-motion video, and a run can raise the
training OmniScore while a scorer it never saw (a *judge*) gets worse. These functions read an eval
comparison table (:func:`videotuna_dpo.pipeline.evaluate.compare_scores`) and say so:

- possible reward hacking: the training OmniScore rises (delta > 0) while a judge falls by more
  than its noise (paired z < -2);
- motion drop: ``dynamic_degree`` or the mean optical-flow magnitude (``motion_magnitude``) of the
  tuned model is significantly lower than the base's (paired z < -2).

:func:`motion_guard_pairs` is ``videotuna pairs --motion-guard``: it refuses pairs whose winner moves
much less than its loser. Judges and motion are raw scores where higher is better (more motion).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.omniscore import MOTION_SCORERS  # eval always scores these

Z_LIMIT = -2.0  # a drop counts when the paired z-score is below this
MOTION_MEASURE = "motion_magnitude"  # what pairs --motion-guard compares (raw, pixels per frame)
HACKING = "possible reward hacking"
MOTION_DROP = "motion drop"


def _row(table: Mapping[str, Any], dimension: str) -> dict | None:
    return next((r for r in table["rows"] if r["dimension"] == dimension), None)


def _falls(row: Mapping[str, Any] | None) -> bool:
    """Whether a row's tuned value is significantly below its base value (paired z < -2)."""
    if row is None or row.get("z") is None:
        return False
    z = row["z"]
    z = -math.inf if z == "-inf" else math.inf if z == "inf" else float(z)
    return row["delta"] < 0 and z < Z_LIMIT


def check_table(table: Mapping[str, Any], judges: Sequence[str] = (), label: str = "tuned",
                against: str = "base") -> dict:
    """The guards of one comparison: judge rows, motion rows, warnings and the two flags.

    ``table`` is a ``compare_scores`` table of ``label`` against ``against``; ``judges`` are the scorer
    names of ``eval.judges`` (their ``raw/<name>`` rows). Returns ``{"judges": [rows], "motion": [rows],
    "possible_reward_hacking": bool, "motion_drop": bool, "warnings": [str]}``.
    """
    omni = _row(table, "omniscore")
    judge_rows = [r for r in (_row(table, f"raw/{j}") for j in judges) if r is not None]
    motion_rows = [r for r in (_row(table, f"raw/{m}") for m in MOTION_SCORERS) if r is not None]
    warnings = []
    hacking = False
    if omni is not None and omni["delta"] > 0:
        for r in judge_rows:
            if _falls(r):
                hacking = True
                warnings.append(f"{HACKING}: {label} vs {against}: training OmniScore {omni['delta']:+.4f} "
                                f"(z {_z(omni)}) while judge {r['dimension'].removeprefix('raw/')} falls "
                                f"{r['delta']:+.4f} (paired z {_z(r)} < {Z_LIMIT:g})")
    motion_drop = False
    for r in motion_rows:
        if _falls(r):
            motion_drop = True
            warnings.append(f"{MOTION_DROP}: {label} vs {against}: {r['dimension'].removeprefix('raw/')} "
                            f"{r['base']:.4g} -> {r['tuned']:.4g} (paired z {_z(r)} < {Z_LIMIT:g}): the tuned model "
                            f"moves significantly less")
    return {"against": against, "judges": judge_rows, "motion": motion_rows, "possible_reward_hacking": hacking,
            "motion_drop": motion_drop, "warnings": warnings}


def _z(row: Mapping[str, Any]) -> str:
    z = row.get("z")
    return "-" if z is None else f"{z:.2f}" if isinstance(z, float) and math.isfinite(z) else str(z)


# ---------------------------------------------------------------- pairs --motion-guard


def motion_of(record: Mapping[str, Any], scores_path: Any) -> float:
    """A scored video's mean flow magnitude (raw ``motion_magnitude``); missing is an error naming the file."""
    value = (record.get("raw") or {}).get(MOTION_MEASURE)
    if value is None:
        raise UserError(f"--motion-guard: {scores_path}: the record of {record['path']} has no {MOTION_MEASURE} "
                        f"score; score with it (videotuna score --scorers ...,{MOTION_MEASURE})")
    return float(value)


def motion_drop(winner_motion: float, loser_motion: float) -> float:
    """How much less the winner moves than the loser, relative to the loser: (l - w) / l; 0 when l <= 0."""
    return (loser_motion - winner_motion) / loser_motion if loser_motion > 0 else 0.0


def motion_guard_pairs(pairs: Sequence[Any], max_drop: float, scores_path: Any) -> tuple[list[Any], dict]:
    """Refuse pairs chosen by the scorer whose winner moves more than ``max_drop`` (relative) less than the loser.

    Pairs a person labelled (``origin`` other than ``scorer``) stay. Returns the pairs kept and the manifest's
    ``motion_guard`` entry (measure, limit, every refused pair with both motions and the drop).
    """
    if not (math.isfinite(max_drop) and 0 <= max_drop < 1):
        raise UserError(f"--max-motion-drop must be in [0, 1) (the winner may move that fraction less than the "
                        f"loser), got {max_drop}")
    kept, refused = [], []
    for pair in pairs:
        w, l = motion_of(pair.winner, scores_path), motion_of(pair.loser, scores_path)
        drop = motion_drop(w, l)
        if pair.origin == "scorer" and drop > max_drop:
            refused.append({"winner": pair.winner["path"], "loser": pair.loser["path"], "prompt": pair.prompt,
                            "winner_motion": w, "loser_motion": l, "drop": drop})
        else:
            kept.append(pair)
    return kept, {"measure": f"raw/{MOTION_MEASURE}", "max_motion_drop": max_drop,
                  "rule": "refused when (loser - winner) / loser > max_motion_drop", "refused": refused}
