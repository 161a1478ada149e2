"""The ``videotuna`` command: one verb per step of the VideoDPO loop.

A verb whose pipeline step imports torch imports it when it runs: ``videotuna --help``, each verb's ``--help``
and ``videotuna plugins`` import no torch (``tests/test_plugins.py`` checks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from videotuna_dpo import __version__
from videotuna_dpo.config import load_config
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.pairs import build_pairs_dataset, short_clip_warning
from videotuna_dpo.registry import Registry, call_with_optional
from videotuna_dpo.review import command as review_parser
from videotuna_dpo.scoring.omniscore import DIMENSIONS, NO_WEIGHTS_DIMENSIONS

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


SCORE_EXAMPLE = (
    "example: videotuna score --videos samples/ --prompts samples/prompts.json --out scores.jsonl "
    f"--scorers {','.join(NO_WEIGHTS_DIMENSIONS)} --batch-size 4"
)
SCORE_DESCRIPTION = """\
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
EVAL_DESCRIPTION = """\
Generate --num-samples videos per prompt from the base model and from each --weights with the same
seeds (video k of prompt i uses seed + i*N + k), score them (--scorers, else the config's
eval.scorers, else the dimensions that need no weights:
{no_weights})
and compare each tuned model with the base per dimension: means, delta, win rate (ties count half)
and the paired z-score of OmniScore. Writes REPORT/report.json, REPORT/report.html and PNG plots;
resumable.
""".format(no_weights=",".join(NO_WEIGHTS_DIMENSIONS))


def _parse_value(text: str) -> Any:
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


def _add_launch_args(p: argparse.ArgumentParser, workers: bool = True) -> None:
    """--devices/--num-nodes/--accelerator (as in training) and --num-workers of a data job."""
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="processes on this machine, one per GPU (or CPU processes); N > 1 starts N-1 more of this "
                   "command. Default: the launcher's processes per node under torchrun/srun, else 1")
    p.add_argument("--num-nodes", type=int, default=None, metavar="M",
                   help="machines of a torchrun/srun job (default: WORLD_SIZE / --devices, else 1)")
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu", "cuda"],
                   help="what each process runs on (default auto: a GPU when there is one)")
    if workers:
        p.add_argument("--num-workers", type=int, default=2, metavar="W",
                       help="DataLoader worker processes per rank that decode videos (default 2; 0 decodes in the rank)")


def _launch(args: argparse.Namespace):
    from videotuna_dpo.jobs import Launch  # imports torch: only when a verb runs

    return Launch(devices=args.devices, num_nodes=args.num_nodes, accelerator=args.accelerator,
                  num_workers=getattr(args, "num_workers", 2))


def _main_process() -> bool:
    from videotuna_dpo.jobs import is_main_process

    return is_main_process()


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
    out = call_with_optional(strategy.run, cfg, registry, resume=args.resume, source=str(args.config))
    print(f"run finished: {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.generate import generate_videos  # imports torch: only when the verb runs

    cfg = load_config(args.config, args.overrides)
    registry = Registry.load(cfg.get("plugins"))
    summary = generate_videos(cfg, registry, args.prompts, args.out, num_samples=args.num_samples,
                              seed=args.seed, weights=args.weights, source=str(args.config), launch=_launch(args),
                              progress=not args.no_progress)
    if not _main_process():  # the other ranks of a multi-process job say nothing
        return 0
    print(f"generated {summary['generated']}, kept {summary['kept']} already complete, in {args.out}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.score import score_videos  # imports torch: only when the verb runs

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
        launch=_launch(args),
    )
    if not _main_process():
        return 0
    print(
        f"scored {summary['scored']}, failed {summary['failed']}, skipped {summary['skipped']} "
        f"(already in {summary['out']})"
    )
    if summary["failed"]:
        print(f"{summary['failed']} video(s) failed; their reasons are the \"failed\" lines of {summary['out']}",
              file=sys.stderr)
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    if args.max_motion_drop is not None and not args.motion_guard:
        raise UserError("--max-motion-drop applies to --motion-guard; add --motion-guard")
    max_drop = (0.5 if args.max_motion_drop is None else args.max_motion_drop) if args.motion_guard else None
    summary = build_pairs_dataset(args.scores, args.out, strategy=args.strategy, min_gap=args.min_gap,
                                  alpha=args.alpha, beta=args.beta, bin_width=args.bin_width, mode=args.mode,
                                  labels=args.labels, by=args.by, max_motion_drop=max_drop)
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
    ranked = "" if args.by == "omniscore" else f" ranked by {args.by}"
    print(f"{summary['pairs']} pairs{ranked} from {summary['prompts']} prompts "
          f"({summary['prompts_without_pair']} without a pair); weights {summary['weight_min']:.3g}.."
          f"{summary['weight_max']:.3g}; train with data.train_data={summary['train_data']}")
    print(f"official VideoDPO code: data_root: {summary['official_train_data']} (its META dir is absolute; "
          f"rerun pairs after moving the dataset)")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.cache import cache_dataset  # imports torch: only when the verb runs

    cfg = load_config(args.config, args.overrides)
    registry = Registry.load(cfg.get("plugins"))
    s = cache_dataset(cfg, registry, args.data, args.out, shard_size=args.shard_size, source=str(args.config),
                      launch=_launch(args))
    if not _main_process():
        return 0
    print(f"encoded {s['encoded']}, kept {s['kept']}, skipped {s['skipped_total']} unreadable video(s); "
          f"{s['shards']} shard(s), {s['bytes'] / max(1, s['videos'] - s['skipped_total']):.0f} bytes per video; "
          f"train with data.cache={args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.evaluate import evaluate  # imports torch: only when the verb runs
    from videotuna_dpo.pipeline.report import format_table  # reads videos (torch): only when the verb runs

    cfg = load_config(args.config, args.overrides)
    registry = Registry.load(cfg.get("plugins"))
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()] if args.scorers else None
    summary = evaluate(cfg, registry, args.prompts, args.weights, args.num_samples, args.out, seed=args.seed,
                       scorers=scorers, scorer_options=parse_options(args.option) or None, source=str(args.config),
                       progress=not args.no_progress, launch=_launch(args))
    if not _main_process():
        return 0
    for label, table in summary["tables"].items():
        print(f"{label} vs base ({table['pairs']} paired videos)")
        print(format_table(table))
        print()
    for warning in (w for table in summary["tables"].values() for w in table["guards"]["warnings"]):
        print(f"warning: {warning}", file=sys.stderr)
    if not summary["tables"]:
        print("no --weights given: only the base model was sampled and scored")
    print(f"report: {summary['report']['html']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.demo import run_demo  # imports torch: only when the verb runs

    s = run_demo(Path(args.out), samples=args.num_samples, eval_samples=args.eval_samples, steps=args.steps,
                 alpha=args.alpha, seed=args.seed, rounds=args.rounds, overrides=args.overrides, run=main,
                 flow=args.flow)
    method = "Flow-DPO of toy_flow" if args.flow else "Diffusion-DPO of toy"
    print(f"\n{method}: OmniScore on held-out seeds: base {s['omniscore_base']:.4f} -> tuned {s['omniscore_tuned']:.4f} "
          f"(delta {s['delta']:+.4f}, paired z {s['paired_z']:.2f}, win rate {s['win_rate']:.2f}, "
          f"{s['paired_videos']} videos) in {s['total_seconds']:.0f} s")
    print(f"report: {s['report']}")
    if not s["passed"]:
        print(f"videotuna demo: the tuned model did not beat the base ({s['criteria']})", file=sys.stderr)
        return 1
    return 0


def _run_apart(argv: list[str]) -> int:
    """``videotuna <argv>`` in a process of its own (the loop's training on several processes); its exit status."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "videotuna_dpo", *argv])


def _cmd_loop(args: argparse.Namespace) -> int:
    from videotuna_dpo.pipeline.loop import HACKING_EXIT, run_loop
    from videotuna_dpo.pipeline.loop_report import summary_line

    s = run_loop(args.config, args.prompts, args.out, rounds=args.rounds, overrides=args.overrides, run=main,
                 run_apart=_run_apart)
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_launch_args(p, workers=False)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "score",
        help="score videos on VBench dimensions -> scores.jsonl (OmniScore)",
        description=SCORE_DESCRIPTION,
        epilog=SCORE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--videos", required=True, help="a directory of videos (recursive), a .txt list of paths, or one video")
    p.add_argument("--prompts", default=None, help="prompts file (.json, .jsonl or .txt); default: <video>.json sidecars")
    p.add_argument("--out", required=True, help="the JSONL file to append to (resumed if it exists)")
    p.add_argument("--scorers", default=None,
                   help=f"comma-separated scorer names (default: all seven: {','.join(DIMENSIONS)})")
    p.add_argument("--batch-size", type=int, default=4, help="videos per batch (default 4)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--option", action="append", default=[], metavar="SCORER.KEY=VALUE",
                   help="a scorer option, e.g. dynamic_degree.fps=16 or aesthetic_quality.clip_weights=PATH (repeatable)")
    p.add_argument("--weight", action="append", default=[], metavar="DIMENSION=W",
                   help="OmniScore weight of a dimension, e.g. dynamic_degree=0.5 (repeatable; 0 leaves it out)")
    p.add_argument("--retry-failed", action="store_true", help="score again the videos recorded as failed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_launch_args(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "pairs",
        help="scores.jsonl -> preference dataset (best vs worst, re-weighted)",
        description="Group scored videos by prompt, pair them and write the official VideoDPO layout plus "
        "manifest.json and PNG plots: train_data.yaml (relative, for this package; the dataset can move) and "
        "train_data_official.yaml (absolute, the data_root to give the official VideoDPO code). Pair weight = "
        "(beta / p) ** alpha with p the pair probability from the OmniScore histogram (or that of the --by score; bin "
        "width 0.01); --mode sqrt uses sqrt(p_w p_l) (the paper, default), "
        "product uses p_w p_l (the official code).",
        epilog="example: videotuna pairs --scores scores.jsonl --out data/pairs --strategy best-worst --alpha 1.0",
    )
    p.add_argument("--scores", required=True, help="scores.jsonl from `videotuna score`")
    p.add_argument("--out", required=True, help="dataset directory to write (a rerun replaces it as a whole)")
    p.add_argument("--strategy", default="best-worst", choices=["best-worst", "all-gap"],
                   help="best-worst: one pair per prompt (paper); all-gap: every pair above --min-gap")
    p.add_argument("--by", default="omniscore", metavar="NAME",
                   help="the score that ranks a prompt's videos and re-weights the pairs: omniscore (default), "
                   "quality, semantic or any scorer's raw score in the records (e.g. a contributed reward model)")
    p.add_argument("--min-gap", type=float, default=0.0,
                   help="minimum gap of a pair in the --by score (ties never pair)")
    p.add_argument("--alpha", type=float, default=1.0, help="re-weighting exponent; 0 = plain DPO (all ones)")
    p.add_argument("--beta", type=float, default=0.72, help="re-weighting constant (default 0.72)")
    p.add_argument("--bin-width", type=float, default=0.01, help="histogram bin width of the --by score")
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
    _add_launch_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser(
        "eval",
        help="base vs tuned weights on the same prompts and seeds -> table + HTML report",
        description=EVAL_DESCRIPTION,
        epilog="example: videotuna eval --config configs/dpo/cogvideox_2b.yaml --prompts eval_prompts.txt "
        "--weights runs/dpo --num-samples 4 --out reports/dpo --seed 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config with `model:` and `generate:` (and optional `eval:`)")
    p.add_argument("--prompts", required=True, help=".txt (one per line) or .json (list or {id: prompt})")
    p.add_argument("--weights", nargs="+", action="extend", default=[], metavar="RUN_DIR_OR_WEIGHTS",
                   help="run dirs (their weights/last) or weights dirs (with trainable.json) to compare with the base")
    p.add_argument("--num-samples", type=int, default=4, help="videos per prompt and model (default 4)")
    p.add_argument("--out", required=True, help="report directory (samples/, scores/, report.json, report.html)")
    p.add_argument("--seed", type=int, default=1000, help="base seed, the same for every model (default 1000)")
    p.add_argument("--scorers", default=None, help="comma-separated scorer names (default: eval.scorers or the "
                   f"no-weights {','.join(NO_WEIGHTS_DIMENSIONS)})")
    p.add_argument("--option", action="append", default=[], metavar="SCORER.KEY=VALUE",
                   help="a scorer option, as in `videotuna score` (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_launch_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p.set_defaults(func=_cmd_eval)

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
