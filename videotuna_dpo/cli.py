"""The ``videotuna`` command: one verb per step of the VideoDPO loop."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from videotuna_dpo import __version__
from videotuna_dpo.config import load_config
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline import evaluate as evaluate_parser
from videotuna_dpo.pipeline import score as score_parser
from videotuna_dpo.registry import Registry
from videotuna_dpo.review import command as review_parser

EPILOG = """\
the loop:
  videotuna generate  prompts -> N videos per prompt
  videotuna score     videos -> scores.jsonl (OmniScore)
  videotuna pairs     scores.jsonl -> preference dataset (best vs worst, re-weighted)
  videotuna review    look at the pairs, label them by hand (pairs --labels applies the labels)
  videotuna cache     preference dataset -> latent shards
  videotuna train     --strategy dpo: fine-tune on the preference dataset
  videotuna loop      rounds of all of the above, each from the previous round's weights, with guards
  videotuna plugins   what is installed: strategies, scorers, datamodules, models
"""


def _cmd_plugins(args: argparse.Namespace) -> int:
    registry = Registry.load()
    rows = [
        {"kind": e.kind, "name": e.name, "plugin": e.plugin, "distribution": e.distribution, "version": e.version}
        for e in registry.entries()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ["kind", "name", "plugin", "distribution", "version"]
    widths = {h: max([len(h)] + [len(str(r[h])) for r in rows]) for h in headers}
    print("  ".join(h.ljust(widths[h]) for h in headers))
    print("  ".join("-" * widths[h] for h in headers))
    for r in rows:
        print("  ".join(str(r[h]).ljust(widths[h]) for h in headers))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    registry = Registry.load(cfg.get("plugins"))
    strategy = registry.get("strategy", args.strategy)
    out = strategy.run(cfg, registry, resume=args.resume, source=str(args.config))
    print(f"run finished: {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.generate import generate_videos

    cfg = load_config(args.config, args.overrides)
    registry = Registry.load(cfg.get("plugins"))
    summary = generate_videos(cfg, registry, args.prompts, args.out, num_samples=args.num_samples,
                              seed=args.seed, weights=args.weights, source=str(args.config))
    print(f"generated {summary['generated']}, kept {summary['kept']} already complete, in {args.out}")
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.pairs import build_pairs_dataset, short_clip_warning

    if args.max_motion_drop is not None and not args.motion_guard:
        raise UserError("--max-motion-drop applies to --motion-guard; add --motion-guard")
    max_drop = (0.5 if args.max_motion_drop is None else args.max_motion_drop) if args.motion_guard else None
    summary = build_pairs_dataset(args.scores, args.out, strategy=args.strategy, min_gap=args.min_gap,
                                  alpha=args.alpha, beta=args.beta, bin_width=args.bin_width, mode=args.mode,
                                  labels=args.labels, max_motion_drop=max_drop)
    if "motion_refused" in summary:
        print(f"--motion-guard: {summary['motion_refused']} pair(s) refused, their winner moving more than "
              f"{max_drop:g} less than their loser (listed in {args.out}/pairs/manifest.json)")
    if summary["failed_videos_left_out"]:
        print(f"{summary['failed_videos_left_out']} video(s) failed scoring and are left out "
              f"(listed in {args.out}/pairs/manifest.json)", file=sys.stderr)
    warning = short_clip_warning(summary)
    if warning:
        print(warning, file=sys.stderr)
    labels = summary.get("labels")
    if labels:
        print(f"labels {args.labels}: {labels['confirmed']} pair(s) confirmed, {labels['flipped']} flipped, "
              f"{labels['dropped_tie']} dropped as ties, {labels['dropped_reject']} dropped with "
              f"{len(labels['rejected_videos'])} rejected video(s) (listed in {args.out}/pairs/manifest.json)")
        if labels["not_applied"]:
            print(f"{len(labels['not_applied'])} label(s) name pairs this dataset does not have (another --strategy or "
                  f"--min-gap?) and were not applied: labels{labels['not_applied'][:10]}", file=sys.stderr)
    print(f"{summary['pairs']} pairs from {summary['prompts']} prompts "
          f"({summary['prompts_without_pair']} without a pair); weights {summary['weight_min']:.3g}.."
          f"{summary['weight_max']:.3g}; train with data.train_data={summary['train_data']}")
    print(f"official VideoDPO code: data_root: {summary['official_train_data']} (its META dir is absolute; "
          f"rerun pairs after moving the dataset)")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.cache import cache_dataset

    cfg = load_config(args.config, args.overrides)
    registry = Registry.load(cfg.get("plugins"))
    s = cache_dataset(cfg, registry, args.data, args.out, shard_size=args.shard_size, source=str(args.config))
    print(f"encoded {s['encoded']}, kept {s['kept']}, skipped {s['skipped_total']} unreadable video(s); "
          f"{s['shards']} shard(s), {s['bytes'] / max(1, s['videos'] - s['skipped_total']):.0f} bytes per video; "
          f"train with data.cache={args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.demo import run_demo

    s = run_demo(Path(args.out), samples=args.num_samples, eval_samples=args.eval_samples, steps=args.steps,
                 alpha=args.alpha, seed=args.seed, rounds=args.rounds, overrides=args.overrides, flow=args.flow)
    method = "Flow-DPO of toy_flow" if args.flow else "Diffusion-DPO of toy"
    print(f"\n{method}: OmniScore on held-out seeds: base {s['omniscore_base']:.4f} -> tuned {s['omniscore_tuned']:.4f} "
          f"(delta {s['delta']:+.4f}, paired z {s['paired_z']:.2f}, win rate {s['win_rate']:.2f}, "
          f"{s['paired_videos']} videos) in {s['total_seconds']:.0f} s")
    print(f"report: {s['report']}")
    if not s["passed"]:
        print(f"videotuna demo: the tuned model did not beat the base ({s['criteria']})", file=sys.stderr)
        return 1
    return 0


def _cmd_loop(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.loop import HACKING_EXIT, run_loop
    from videotuna_dpo.pipeline.loop_report import summary_line

    s = run_loop(args.config, args.prompts, args.out, rounds=args.rounds, overrides=args.overrides, run=main)
    for warning in s["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"\n{summary_line(s)}")
    print(f"report: {s['report']['html']}")
    return HACKING_EXIT if s["possible_reward_hacking"] else 0


def _add_loop_parser(sub) -> None:
    p = sub.add_parser(
        "loop",
        help="iterative VideoDPO: rounds of generate -> score -> pairs -> cache -> train -> eval",
        description="Run --rounds rounds of VideoDPO, each step the public verb: generate loop.samples videos per "
        "training prompt with the previous round's weights (the base first), score them with eval.scorers, pairs, "
        "cache, train --strategy dpo from the previous round's weights (reference: loop.reference, base or "
        "previous), then eval on the held-out prompts (loop.holdout_fraction of them) and seeds against the base "
        "and the previous round, with eval.judges (scorers training never uses) and the motion measures apart. "
        "Resumable: a rerun continues at the step that did not finish. Writes OUT/report/loop.html and loop.json. "
        "Exit status 3 when a round is marked possible reward hacking (the training OmniScore rises while a judge "
        "falls with paired z < -2); loop.stop_on_hacking=true then stops further rounds.",
        epilog="example: videotuna loop --config configs/dpo/cogvideox_2b.yaml --prompts prompts.txt --rounds 3 "
        "--out runs/loop loop.samples=4 loop.reference=base 'eval.judges=[aesthetic_quality]'",
    )
    p.add_argument("--config", required=True, help="training config (model, data, dpo, generate, eval, loop blocks)")
    p.add_argument("--prompts", required=True, help=".txt (one per line) or .json (list or {id: prompt}); split into "
                   "training and held-out prompts by loop.holdout_fraction")
    p.add_argument("--rounds", type=int, default=None, help="rounds to run (default loop.rounds, 2)")
    p.add_argument("--out", required=True, help="loop directory (rounds, eval, report); a rerun resumes it")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys, loop.* too)")
    p.set_defaults(func=_cmd_loop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videotuna",
        description="VideoDPO for VideoTuna: generate, score, pair, cache and DPO-train text-to-video models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"videotuna-dpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "plugins",
        help="list installed strategies, scorers, datamodules and models",
        description="List every strategy, scorer, datamodule and model backend of the installed "
        "`videotuna` plugins, with the distribution and version that provides it.",
        epilog="example: videotuna plugins --json",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser(
        "train",
        help="train with a strategy (e.g. dpo) from a YAML config",
        description="Train with the named strategy. Any `key=value` after the options overrides the "
        "config's dotted key (e.g. optimizer.lr=1e-5 lightning.trainer.max_steps=100).",
        epilog="example: videotuna train --strategy dpo --config configs/dpo/cogvideox_2b.yaml "
        "data.train_data=data/pairs/train_data.yaml optimizer.lr=1e-5",
    )
    p.add_argument("--strategy", required=True, help="strategy name, see `videotuna plugins`")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--resume", default=None, help="Lightning checkpoint to resume from exactly, or 'last'")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser(
        "generate",
        help="sample N videos per prompt with a backend -> mp4 + a JSON record each",
        description="Generate --num-samples videos per prompt with the config's `model:` backend and its "
        "`generate:` settings (num_frames, steps, guidance, height, width, fps, batch_size). Resumable: "
        "complete videos are kept, partial files never survive a kill.",
        epilog="example: videotuna generate --config configs/dpo/cogvideox_2b.yaml --prompts prompts.txt "
        "--num-samples 4 --out samples/ --seed 0",
    )
    p.add_argument("--config", required=True, help="YAML config with a `model:` block")
    p.add_argument("--prompts", required=True, help=".txt (one per line) or .json (list or {id: prompt})")
    p.add_argument("--num-samples", type=int, default=4, help="videos per prompt (default 4, as the paper)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="base seed; video k of prompt i uses seed + i*N + k")
    p.add_argument("--weights", default=None, help="tuned weights (a run's weights/last) to sample with")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.set_defaults(func=_cmd_generate)

    score_parser.add_parser(sub)

    p = sub.add_parser(
        "pairs",
        help="scores.jsonl -> preference dataset (best vs worst, re-weighted)",
        description="Group scored videos by prompt, pair them and write the official VideoDPO layout plus "
        "manifest.json and PNG plots: train_data.yaml (relative, for this package; the dataset can move) and "
        "train_data_official.yaml (absolute, the data_root to give the official VideoDPO code). Pair weight = "
        "(beta / p) ** alpha with p the pair probability from the OmniScore histogram (bin width 0.01); --mode sqrt uses sqrt(p_w p_l) (the paper, default), "
        "product uses p_w p_l (the official code).",
        epilog="example: videotuna pairs --scores scores.jsonl --out data/pairs --strategy best-worst --alpha 1.0",
    )
    p.add_argument("--scores", required=True, help="scores.jsonl from `videotuna score`")
    p.add_argument("--out", required=True, help="dataset directory to write (a rerun replaces it as a whole)")
    p.add_argument("--strategy", default="best-worst", choices=["best-worst", "all-gap"],
                   help="best-worst: one pair per prompt (paper); all-gap: every pair above --min-gap")
    p.add_argument("--min-gap", type=float, default=0.0, help="minimum OmniScore gap of a pair (ties never pair)")
    p.add_argument("--alpha", type=float, default=1.0, help="re-weighting exponent; 0 = plain DPO (all ones)")
    p.add_argument("--beta", type=float, default=0.72, help="re-weighting constant (default 0.72)")
    p.add_argument("--bin-width", type=float, default=0.01, help="OmniScore histogram bin width")
    p.add_argument("--mode", default="sqrt", choices=["sqrt", "product"], help="pair probability (default sqrt)")
    p.add_argument("--labels", default=None, metavar="LABELS_JSON",
                   help="labels.json of `videotuna review`: keep confirms a pair, flip swaps winner and loser, tie "
                   "drops it, reject drops every pair of the broken video")
    p.add_argument("--motion-guard", action="store_true",
                   help="refuse pairs whose winner moves much less than its loser (mean optical-flow magnitude, the "
                   "motion_magnitude score: score with it); refused pairs are listed in the manifest")
    p.add_argument("--max-motion-drop", type=float, default=None, metavar="X",
                   help="with --motion-guard: refuse a pair when (loser - winner) / loser motion > X (default 0.5)")
    p.set_defaults(func=_cmd_pairs)

    review_parser.add_parser(sub)

    p = sub.add_parser(
        "cache",
        help="encode a preference dataset's videos and captions once -> latent shards",
        description="Encode every video of the dataset with the backend's VAE (at data.resolution, "
        "data.video_length and data.frame_stride, from the first frame) and every caption with its text "
        "encoder, into safetensors shards. Resumable; unreadable videos are skipped and reported, and "
        "training from the cache leaves out exactly their pairs. Train with data.cache=CACHE.",
        epilog="example: videotuna cache --config configs/dpo/cogvideox_2b.yaml --data data/pairs --out data/cache",
    )
    p.add_argument("--config", required=True, help="the training config (model and data settings)")
    p.add_argument("--data", required=True, help="dataset dir (with train_data.yaml) or the train_data.yaml")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--shard-size", type=int, default=32, help="videos per shard")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.set_defaults(func=_cmd_cache)

    evaluate_parser.add_parser(sub)

    p = sub.add_parser(
        "demo",
        help="the whole VideoDPO loop on the toy world, offline, on a CPU",
        description="Run generate -> score -> pairs -> cache -> train --strategy dpo -> eval on the toy "
        "world's shipped base model (coloured shapes moving across 32x32 frames), then check that the "
        "tuned model beats the base on held-out seeds (mean OmniScore, paired z > 2, win rate > 0.5). "
        "Exits 1 when it does not. Reruns resume. --flow runs the same loop and check as Flow-DPO on the "
        "flow-matching toy model (backend toy_flow: rectified flow, velocity target, Euler sampling).",
        epilog="example: videotuna demo --out demo_out; videotuna demo --flow --out demo_flow_out",
    )
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt for the pairs (default 4)")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="held-out samples per prompt and model (default 4; 8 with --flow)")
    p.add_argument("--rounds", type=int, default=4, help="each caption is a prompt this many times (pairs = 32 x rounds)")
    p.add_argument("--steps", type=int, default=None, help="DPO steps (default 100; 200 with --flow)")
    p.add_argument("--alpha", type=float, default=1.0, help="re-weighting exponent (0 = plain DPO)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (held-out seeds start at 10000 + seed)")
    p.add_argument("--flow", action="store_true",
                   help="Flow-DPO of the flow-matching toy (toy_flow; config toy/demo.yaml + toy/demo_flow.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config (toy/demo.yaml)")
    p.set_defaults(func=_cmd_demo)
    _add_loop_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away is found here, not in Python's flush at exit
        return code
    except UserError as exc:
        print(f"videotuna: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `videotuna plugins --json | head`: stop quietly, as other CLIs do. stdout goes to /dev/null so that
        # Python's own flush at exit does not report the same closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # killed by SIGPIPE, as a shell reports it for other commands


if __name__ == "__main__":
    sys.exit(main())
