"""``videotuna demo``: the whole VideoDPO loop on the toy world, offline, on a CPU, in minutes.

Each step is a public CLI verb: generate 4 samples per prompt -> score -> pairs (re-weighted) ->
cache -> train --strategy dpo -> eval (base and tuned on held-out seeds). The demo checks itself:
it fails unless the tuned model beats the base on mean OmniScore with a paired z-score above 2 and
a win rate above 0.5. ``--flow`` runs the same loop as Flow-DPO on the flow-matching toy (``toy_flow``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import OmegaConf

from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.evaluate import table_row
from videotuna_dpo.toy.world import all_specs
from videotuna_dpo.user_files import read_json

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "toy" / "demo.yaml"
FLOW_DEMO_CONFIG = DEMO_CONFIG.with_name("demo_flow.yaml")  # merged over demo.yaml by --flow
SCORERS = "temporal_flickering,dynamic_degree,motion_smoothness,toy_alignment"
MIN_Z, MIN_WIN_RATE = 2.0, 0.5
# (DPO steps, held-out samples per prompt) when not given. Flow-DPO of the toy gains as much OmniScore
# (+0.003) but more slowly and with a noisier semantic part: 200 steps, and 8 held-out samples per prompt
# (256 paired videos) so that a gain of that size reaches paired z > 2 (README, "videotuna demo --flow").
DEFAULTS = {False: (100, 4), True: (200, 8)}


def demo_steps(out: Path, samples: int, eval_samples: int, steps: int, alpha: float, seed: int,
               overrides: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """The CLI invocations of the demo, in order (name, argv)."""
    cfg = str(out / "demo.yaml")
    paths = [f"output_dir={out / 'run'}", f"data.train_data={out / 'pairs' / 'train_data.yaml'}",
             f"data.cache={out / 'cache'}", f"lightning.trainer.max_steps={steps}",
             f"lightning.checkpoint.every_n_train_steps={steps}", f"seed={seed}", *overrides]
    prompts = str(out / "prompts.txt")
    return [
        ("generate", ["generate", "--config", cfg, "--prompts", str(out / "train_prompts.json"), "--num-samples", str(samples),
                      "--out", str(out / "samples"), "--seed", str(seed), *paths]),
        ("score", ["score", "--videos", str(out / "samples"), "--out", str(out / "scores.jsonl"),
                   "--scorers", SCORERS, "--batch-size", "16"]),
        ("pairs", ["pairs", "--scores", str(out / "scores.jsonl"), "--out", str(out / "pairs"), "--alpha", str(alpha)]),
        ("cache", ["cache", "--config", cfg, "--data", str(out / "pairs"), "--out", str(out / "cache"), *paths]),
        ("train", ["train", "--strategy", "dpo", "--config", cfg, *paths]),
        ("eval", ["eval", "--config", cfg, "--prompts", prompts, "--weights", str(out / "run"), "--num-samples",
                  str(eval_samples), "--out", str(out / "report"), "--seed", str(10_000 + seed), "--scorers", SCORERS,
                  *paths]),
    ]


def write_demo_config(out: Path, flow: bool = False) -> Path:
    """``out/demo.yaml``: toy/demo.yaml, or with ``flow`` toy/demo_flow.yaml merged over it (model toy_flow).

    An ``out`` whose demo.yaml names the other model is refused: its samples and scores are that model's.
    """
    path = out / "demo.yaml"
    model = "toy_flow" if flow else "toy"
    if path.is_file():
        before = OmegaConf.load(path).get("model", {}).get("name")
        if before != model:
            raise UserError(f"{path}: this output directory holds a demo of model {before!r}, not {model!r} "
                            f"(its samples would be reused); give another --out")
    if not flow:
        path.write_text(DEMO_CONFIG.read_text())
        return path
    merged = OmegaConf.merge(OmegaConf.load(DEMO_CONFIG), OmegaConf.load(FLOW_DEMO_CONFIG))
    path.write_text("# videotuna demo --flow: toy/demo.yaml with toy/demo_flow.yaml merged over it\n"
                    + OmegaConf.to_yaml(merged))
    return path


def write_prompts(out: Path, rounds: int) -> None:
    """prompts.txt: the 32 captions (held-out evaluation); train_prompts.json: each caption ``rounds`` times.

    Every entry of train_prompts.json is its own prompt (id ``<caption index>_r<round>``), so
    best-vs-worst of N samples yields one pair per entry: ``32 * rounds`` pairs.
    """
    captions = [s.caption for s in all_specs()]
    (out / "prompts.txt").write_text("".join(c + "\n" for c in captions))
    entries = {f"c{i:02d}_r{r}": c for r in range(rounds) for i, c in enumerate(captions)}
    (out / "train_prompts.json").write_text(json.dumps(entries, indent=1))


def run_demo(out: str | Path, samples: int = 4, eval_samples: int | None = None, steps: int | None = None,
             alpha: float = 1.0, seed: int = 0, rounds: int = 4, overrides: Sequence[str] = (), *,
             run: Callable[[list[str]], int], flow: bool = False) -> dict:
    """Run every step (each resumes when rerun), then check the result; returns the summary.

    ``run`` runs one ``videotuna`` command line and returns its exit status (the CLI passes its ``main``).

    ``flow``: Flow-DPO of the flow-matching toy ``toy_flow`` instead of Diffusion-DPO of ``toy``.
    ``steps`` and ``eval_samples`` default to that model's :data:`DEFAULTS`.
    """
    default_steps, default_eval = DEFAULTS[flow]
    steps = default_steps if steps is None else steps
    eval_samples = default_eval if eval_samples is None else eval_samples
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_demo_config(out, flow)
    write_prompts(out, rounds)
    timings = {}
    for name, argv in demo_steps(out, samples, eval_samples, steps, alpha, seed, overrides):
        print(f"\n== videotuna {' '.join(argv[:1])} ==", flush=True)
        start = time.time()
        code = run(argv)
        if code != 0:
            raise UserError(f"demo step `videotuna {name}` failed (exit code {code})")
        timings[name] = round(time.time() - start, 1)
    report = read_json(out / "report" / "report.json")
    table = next(iter(report["tables"].values()))
    row = table_row(table, "omniscore")
    passed = row["delta"] > 0 and (row["z"] or 0) > MIN_Z and row["win_rate"] > MIN_WIN_RATE
    summary = {
        "model": "toy_flow" if flow else "toy",
        "omniscore_base": row["base"], "omniscore_tuned": row["tuned"], "delta": row["delta"],
        "paired_z": row["z"], "win_rate": row["win_rate"], "paired_videos": row["n"],
        "passed": passed, "criteria": f"delta > 0, paired z > {MIN_Z}, win rate > {MIN_WIN_RATE}",
        "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
        "report": str(out / "report" / "report.html"),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
