"""The paper's ablation on the toy world: re-weighting on/off (alpha 1 vs 0) and beta, over seeds.

``python -m videotuna_dpo.toy.ablation --out ablation/ [--seeds 3] [--betas 2000 5000]``
One pool of base samples and scores (the demo's first steps) is shared; every (alpha, beta, seed)
builds its pairs, trains and is evaluated on the same held-out seeds. Prints a table (mean +- std
over seeds of the OmniScore delta, win rate and paired z) and writes ablation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from videotuna_dpo.cli import main as cli_main
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.demo import SCORERS, demo_steps, write_prompts
from videotuna_dpo.pipeline.demo import DEMO_CONFIG
from videotuna_dpo.pipeline.evaluate import compare_scores, table_row


def _run(argv: list[str]) -> None:
    if cli_main(argv) != 0:
        raise UserError(f"ablation step failed: videotuna {' '.join(argv)}")


def ablation(out: Path, seeds: int, alphas: list[float], betas: list[float], steps: int, rounds: int) -> list[dict]:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.yaml").write_text(DEMO_CONFIG.read_text())
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
                name = f"a{alpha:g}_b{beta:g}_s{seed}"
                common = [f"output_dir={out / 'runs' / name}", f"data.train_data={data / 'train_data.yaml'}",
                          f"data.cache={cache}", f"dpo.beta={beta}", f"seed={seed}",
                          f"lightning.trainer.max_steps={steps}", f"lightning.checkpoint.every_n_train_steps={steps}"]
                _run(["train", "--strategy", "dpo", "--config", cfg, *common])
                _run(["eval", "--config", cfg, "--prompts", str(out / "prompts.txt"), "--num-samples", "4",
                      "--out", str(out / "report"), "--seed", "10000", "--scorers", SCORERS, "--no-progress",
                      "--weights", str(out / "runs" / name)])
                row = table_row(compare_scores(out / "report" / "scores" / "base.jsonl",
                                               out / "report" / "scores" / f"{name}.jsonl"))
                rows.append({"alpha": alpha, "beta": beta, "seed": seed, "delta": row["delta"],
                             "win_rate": row["win_rate"], "z": row["z"]})
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    return rows


def summarize(rows: list[dict]) -> str:
    """One line per (alpha, beta): mean +- std over seeds of delta, win rate and z."""
    lines = ["alpha   beta   delta OmniScore        win rate        paired z", "-" * 62]
    for key in sorted({(r["alpha"], r["beta"]) for r in rows}):
        group = [r for r in rows if (r["alpha"], r["beta"]) == key]

        def stat(name: str, digits: int, sign: str = "") -> str:
            values = [float(r[name]) for r in group]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):{sign}.{digits}f} +- {std:.{digits}f}"

        lines.append(f"{key[0]:<7g} {key[1]:<6g} {stat('delta', 4, '+'):<22} {stat('win_rate', 2):<15} {stat('z', 2)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("ablation"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--betas", type=float, nargs="+", default=[2000.0, 5000.0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rows = ablation(args.out, args.seeds, args.alphas, args.betas, args.steps, args.rounds)
    print(summarize(rows))


if __name__ == "__main__":
    main()
