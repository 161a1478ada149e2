"""The paper's ablation on the toy world: re-weighting on/off (alpha 1 vs 0) and beta, over seeds.

``python -m videotuna_dpo.toy.ablation --out ablation/ [--seeds 3] [--betas 2000 5000] [--flow]``
One pool of base samples and scores (the demo's first steps) is shared; every (alpha, beta, seed)
builds its pairs, trains and is evaluated on the same held-out seeds. Prints a table (mean +- std
over seeds of the OmniScore delta, win rate and paired z) and writes ablation.json. ``--flow`` runs it
as Flow-DPO on the flow-matching toy (``videotuna demo --flow``'s config), ``--beta-schedule`` picks
beta on the velocity error as is (constant) or on the noise error it implies (eps_equivalent).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable

from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.demo import DEFAULTS, SCORERS, demo_steps, write_demo_config, write_prompts
from videotuna_dpo.pipeline.evaluate import compare_scores, table_row


def ablation(out: Path, seeds: int, alphas: list[float], betas: list[float], steps: int | None, rounds: int,
             flow: bool = False, beta_schedule: str = "constant", *,
             run: Callable[[list[str]], int]) -> list[dict]:
    """``run``: runs one ``videotuna`` command line and returns its exit status (``main`` passes the CLI's)."""

    def _run(argv: list[str]) -> None:
        if run(argv) != 0:
            raise UserError(f"ablation step failed: videotuna {' '.join(argv)}")

    default_steps, eval_samples = DEFAULTS[flow]  # the demo's: held-out samples per prompt, and steps unless given
    steps = default_steps if steps is None else steps
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_demo_config(out, flow)
    write_prompts(out, rounds)
    steps_by_name = dict(demo_steps(out, 4, 4, steps, 1.0, 0))
    _run(steps_by_name["generate"])
    _run(steps_by_name["score"])
    cfg = str(out / "demo.yaml")
    rows = []
    for alpha in alphas:
        data = out / f"pairs_a{alpha:g}"
        _run(["pairs", "--scores", str(out / "scores.jsonl"), "--out", str(data), "--alpha", str(alpha)])
        cache = out / f"cache_a{alpha:g}"  # not inside the dataset dir, which a rerun of pairs replaces whole
        _run(["cache", "--config", cfg, "--data", str(data), "--out", str(cache),
              f"data.train_data={data / 'train_data.yaml'}"])
        for beta in betas:
            for seed in range(seeds):
                schedule = "" if beta_schedule == "constant" else f"_{beta_schedule}"
                name = f"a{alpha:g}_b{beta:g}{schedule}_s{seed}"
                common = [f"output_dir={out / 'runs' / name}", f"data.train_data={data / 'train_data.yaml'}",
                          f"data.cache={cache}", f"dpo.beta={beta}", f"seed={seed}",
                          *([f"dpo.beta_schedule={beta_schedule}"] if flow else []),
                          f"lightning.trainer.max_steps={steps}", f"lightning.checkpoint.every_n_train_steps={steps}"]
                _run(["train", "--strategy", "dpo", "--config", cfg, *common])
                _run(["eval", "--config", cfg, "--prompts", str(out / "prompts.txt"), "--num-samples", str(eval_samples),
                      "--out", str(out / "report"), "--seed", "10000", "--scorers", SCORERS, "--no-progress",
                      "--weights", str(out / "runs" / name)])
                row = table_row(compare_scores(out / "report" / "scores" / "base.jsonl",
                                               out / "report" / "scores" / f"{name}.jsonl"))
                rows.append({"model": "toy_flow" if flow else "toy", "beta_schedule": beta_schedule,
                             "alpha": alpha, "beta": beta, "seed": seed, "delta": row["delta"],
                             "win_rate": row["win_rate"], "z": row["z"]})
    # Rows of earlier settings on the same pool (e.g. the other beta schedule) stay; this run's replace theirs.
    def key(r: dict) -> tuple:
        return r.get("beta_schedule", "constant"), r["alpha"], r["beta"], r["seed"]

    earlier = json.loads((out / "ablation.json").read_text()) if (out / "ablation.json").is_file() else []
    now = {key(r) for r in rows}
    (out / "ablation.json").write_text(json.dumps([r for r in earlier if key(r) not in now] + rows, indent=2))
    return rows


def summarize(rows: list[dict]) -> str:
    """One line per (alpha, beta) of one model and beta schedule: mean +- std over seeds of delta, win rate and z."""
    title = f"model {rows[0].get('model', 'toy')}, dpo.beta_schedule {rows[0].get('beta_schedule', 'constant')}"
    lines = [title, "alpha   beta   delta OmniScore        win rate        paired z", "-" * 62]
    for key in sorted({(r["alpha"], r["beta"]) for r in rows}):
        group = [r for r in rows if (r["alpha"], r["beta"]) == key]

        def stat(name: str, digits: int, sign: str = "") -> str:
            values = [float(r[name]) for r in group]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):{sign}.{digits}f} +- {std:.{digits}f}"

        lines.append(f"{key[0]:<7g} {key[1]:<6g} {stat('delta', 4, '+'):<22} {stat('win_rate', 2):<15} {stat('z', 2)}")
    return "\n".join(lines)


def main() -> None:
    from videotuna_dpo.cli import main as cli_main  # the program's entry: the toy package stays below the CLI

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ablation"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[2000.0, 5000.0])
    parser.add_argument("--steps", type=int, default=None, help="DPO steps (default 100; 200 with --flow)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--flow", action="store_true", help="Flow-DPO of the flow-matching toy (toy_flow)")
    parser.add_argument("--beta-schedule", default="constant", choices=["constant", "eps_equivalent"],
                        help="with --flow: beta on the velocity error (constant) or its implied noise error")
    args = parser.parse_args()
    if args.beta_schedule != "constant" and not args.flow:
        parser.error("--beta-schedule applies to --flow (the eps toy trains with its own noise schedule)")
    rows = ablation(args.out, args.seeds, args.alphas, args.betas, args.steps, args.rounds, args.flow,
                    args.beta_schedule, run=cli_main)
    print(summarize(rows))


if __name__ == "__main__":
    main()
