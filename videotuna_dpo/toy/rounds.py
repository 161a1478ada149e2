"""Iterative VideoDPO on the toy world: ``videotuna loop`` for 3 rounds, with judges the training never sees.

``python -m videotuna_dpo.toy.rounds --out rounds/ [--seeds 1] [--rounds 3] [--hack] [key=value ...]``

The demo's model and settings (``toy/demo.yaml``: 100 DPO steps a round, beta 2000, full fine-tune,
reference: the base); the 32 captions, each 4 prompt entries, split by caption: 8 captions held out
for evaluation (16 seeds each, 128 videos per model), 24 trained on (4 samples per entry: 384 videos
and 96 pairs a round). Training scores with the demo's OmniScore (temporal flickering, dynamic
degree, motion smoothness, toy_alignment); the judges ``toy_travel`` and ``toy_shape_fidelity`` are
never trained on. ``--hack`` trains on a scorer without its motion and caption terms (temporal
flickering and motion smoothness only, which a static video maximises) and judges with
``toy_alignment`` too: the guards should flag it. Prints the per-round table (mean +- std over seeds)
and writes ``rounds.json``; each seed's loop is ``OUT/seed_<s>`` (its report: ``report/loop.html``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

from videotuna_dpo.pipeline.demo import DEMO_CONFIG
from videotuna_dpo.toy.world import all_specs

TRAIN_SCORERS = "[temporal_flickering,dynamic_degree,motion_smoothness,toy_alignment]"
JUDGES = ["toy_travel", "toy_shape_fidelity"]
HACK_SCORERS = "[temporal_flickering,motion_smoothness]"  # no motion term, no caption term
ENTRIES_PER_CAPTION = 4


def loop_overrides(seed: int, hack: bool) -> list[str]:
    """The ``videotuna loop`` overrides of one seed's run (the demo config's own settings otherwise)."""
    judges = JUDGES + (["toy_alignment"] if hack else [])
    return [f"eval.scorers={HACK_SCORERS if hack else TRAIN_SCORERS}", f"eval.judges=[{','.join(judges)}]",
            "loop.samples=4", "loop.eval_samples=16", "loop.holdout_fraction=0.25", "loop.reference=base",
            f"loop.seed={seed * 1_000_000}", f"seed={seed}", "loop.eval_seed=10000", "loop.score_batch_size=16",
            "lightning.trainer.enable_progress_bar=false"]


def write_prompts(path: Path) -> Path:
    """The 32 captions, each ``ENTRIES_PER_CAPTION`` entries (``c<i>_e<k>``): one best-vs-worst pair per entry."""
    captions = [s.caption for s in all_specs()]
    entries = {f"c{i:02d}_e{k}": c for k in range(ENTRIES_PER_CAPTION) for i, c in enumerate(captions)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1))
    return path


def _row(rec: dict, against: str, dimension: str) -> dict | None:
    rows = rec["against"].get(against, {}).get("rows", [])
    return next((r for r in rows if r["dimension"] == dimension), None)


def round_rows(summary: dict) -> list[dict]:
    """Per round of one loop: held-out OmniScore and judges, their deltas and paired z against the base and the
    previous round, motion, and the guards' flags."""
    from videotuna_dpo.pipeline.loop_report import per_round

    series = per_round(summary)
    judges = summary["judges"]
    rows = []
    for i, rec in enumerate(summary["rounds"]):
        row = {"round": rec["round"], "omniscore": series["omniscore"][i + 1], "base_omniscore": series["omniscore"][0],
               "possible_reward_hacking": rec["possible_reward_hacking"], "motion_drop": rec["motion_drop"],
               "implicit_acc": rec["train"].get("train/implicit_acc")}
        for dim in ["omniscore", *[f"raw/{j}" for j in judges], "raw/motion_magnitude", "raw/dynamic_degree"]:
            name = dim.split("/", 1)[-1]
            base = _row(rec, "base", dim)
            prev = _row(rec, f"round_{rec['round'] - 1}", dim)
            row[f"{name}"] = base["tuned"]
            row[f"{name}_base"] = base["base"]
            row[f"{name}_delta"], row[f"{name}_z"] = base["delta"], base["z"]
            row[f"{name}_win"] = base["win_rate"]
            row[f"{name}_delta_prev"] = prev["delta"] if prev else None
            row[f"{name}_z_prev"] = prev["z"] if prev else None
        rows.append(row)
    return rows


def _stat(values: Sequence[float], digits: int, sign: str = "") -> str:
    values = [float(v) for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.{digits}f} +- {std:.{digits}f}"


def summarize(by_seed: dict[int, list[dict]], judges: Sequence[str]) -> str:
    """One line per round: mean +- std over seeds of the OmniScore delta vs base (and z), vs the previous round,
    each judge's delta vs base (and z), the motion magnitude's delta, and how many seeds each guard flagged."""
    seeds = sorted(by_seed)
    rounds = max(len(rows) for rows in by_seed.values())
    head = ["round", "OmniScore d vs base", "z", "d vs prev", *[f"{j} d vs base" for j in judges],
            *[f"{j} z" for j in judges], "motion d", "flagged"]
    lines = [f"{len(seeds)} seed(s): " + ", ".join(map(str, seeds)), " | ".join(head)]
    for r in range(rounds):
        rows = [by_seed[s][r] for s in seeds if len(by_seed[s]) > r]
        cells = [str(r + 1), _stat([x["omniscore_delta"] for x in rows], 4, "+"),
                 _stat([x["omniscore_z"] for x in rows], 2), _stat([x["omniscore_delta_prev"] for x in rows], 4, "+")]
        cells += [_stat([x[f"{j}_delta"] for x in rows], 4, "+") for j in judges]
        cells += [_stat([x[f"{j}_z"] for x in rows], 2) for j in judges]
        cells += [_stat([x["motion_magnitude_delta"] for x in rows], 3, "+"),
                  f"hacking {sum(x['possible_reward_hacking'] for x in rows)}/{len(rows)}, "
                  f"motion {sum(x['motion_drop'] for x in rows)}/{len(rows)}"]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def rounds(out: Path, seeds: Sequence[int], n_rounds: int, hack: bool, overrides: Sequence[str],
           run: Callable[[list[str]], int]) -> dict:
    """Run the loop for each seed (each resumes when rerun); returns ``{"seeds": {s: rows}, "table": str}``."""
    from videotuna_dpo.pipeline.loop import run_loop
    from videotuna_dpo.pipeline.report import json_safe

    out = out.resolve()
    prompts = write_prompts(out / "prompts.json")
    by_seed, judges = {}, JUDGES + (["toy_alignment"] if hack else [])
    for seed in seeds:
        summary = run_loop(DEMO_CONFIG, prompts, out / f"seed_{seed}", rounds=n_rounds,
                           overrides=[*loop_overrides(seed, hack), *overrides], run=run)
        by_seed[seed] = round_rows(summary)
    table = summarize(by_seed, judges)
    result = {"hack": hack, "overrides": list(overrides), "seeds": by_seed, "table": table}
    (out / "rounds.json").write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from videotuna_dpo.cli import main as cli_main

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("rounds"))
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1: about 5 minutes on 2 idle cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hack", action="store_true",
                        help="train on temporal flickering + motion smoothness only (no motion, no caption term)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the loop config")
    args = parser.parse_args(argv)
    result = rounds(args.out, list(range(args.seeds)), args.rounds, args.hack, args.overrides, cli_main)
    print(result["table"])
    flagged = any(r["possible_reward_hacking"] for rows in result["seeds"].values() for r in rows)
    return 3 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
