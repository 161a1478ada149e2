"""``videotuna loop``: iterative VideoDPO, round after round, each step the public verb it already is.

Round r: ``generate`` N samples per training prompt with round r-1's weights (the base for r = 1) ->
``score`` -> ``pairs`` -> ``cache`` -> ``train --strategy dpo`` starting from round r-1's weights ->
``eval`` on the held-out prompts and seeds, against the base and against round r-1. The prompts are
split once into training and held-out prompts (``loop.holdout_fraction``), so evaluation never sees a
training prompt. ``loop.reference``: ``base`` keeps the base model as the DPO reference of every round
(the policy starts from round r-1's weights); ``previous`` makes round r-1's model the reference too
(full fine-tunes only). Every finished step is recorded in ``OUT/loop_state.json``: a killed loop reruns
from the step it stopped in (that verb resumes itself) with nothing before it redone.

Layout of ``OUT``::

    config.yaml              the config every verb runs with (the given one without its loop: block)
    loop_state.json          settings and the finished steps
    prompts/train.json       training prompts; prompts/heldout.json: evaluation prompts
    round_<r>/samples/ scores.jsonl pairs/ cache/ run/ weights/last/ eval.json
    eval/                    `videotuna eval` of every round so far against the base (samples, scores, report)
    report/loop.html         OmniScore and every dimension per round, win rates, guards (loop.json: the numbers)
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import OmegaConf

from videotuna_dpo.config import check_values, load_config, validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import atomic_directory, check_writable_dir, write_json_atomic, write_text_atomic
from videotuna_dpo.eval_callback import check_judges
from videotuna_dpo.pipeline.guards import MOTION_MEASURE, check_table
from videotuna_dpo.pipeline.prompts import load_prompt_file
from videotuna_dpo.user_files import read_json

REFERENCES = ("base", "previous")
STATE = "loop_state.json"
HACKING_EXIT = 3  # the exit status of `videotuna loop` when a round is marked as possible reward hacking
# Settings a rerun may change: how many rounds, and whether to stop at a flagged round.
RERUN_MAY_CHANGE = ("rounds", "stop_on_hacking")


@dataclass
class LoopPairsSchema:
    """``loop.pairs``: the options of each round's ``videotuna pairs``."""

    strategy: str = "best-worst"
    alpha: float = 1.0
    min_gap: float = 0.0
    mode: str = "sqrt"
    motion_guard: bool = False  # pairs --motion-guard
    max_motion_drop: float = 0.5


@dataclass
class LoopSchema:
    """The ``loop:`` block of a config (read by ``videotuna loop`` only; the verbs never see it)."""

    rounds: int = 2  # --rounds overrides it
    samples: int = 4  # videos per training prompt per round (N)
    eval_samples: int = 4  # videos per held-out prompt and model
    holdout_fraction: float = 0.25  # share of the distinct prompts held out for evaluation (0: evaluate on them all)
    reference: str = "base"  # base | previous: the DPO reference of round r >= 2
    seed: int = 0  # sample k of training prompt i in round r uses seed + (r-1) * P * N + i * N + k
    eval_seed: int = 10_000  # the held-out seeds, the same for every round
    stop_on_hacking: bool = False  # stop after a round marked possible reward hacking
    score_batch_size: int = 8
    pairs: LoopPairsSchema = field(default_factory=LoopPairsSchema)


LOOP_RULES = {
    "rounds": (lambda v: v >= 1, "an integer >= 1"), "samples": (lambda v: v >= 2, "an integer >= 2 (pairs need two)"),
    "eval_samples": (lambda v: v >= 1, "an integer >= 1"), "score_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "holdout_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "reference": (lambda v: v in REFERENCES, f"one of {', '.join(REFERENCES)}"),
}
PAIRS_RULES = {
    "strategy": (lambda v: v in ("best-worst", "all-gap"), "best-worst or all-gap"),
    "mode": (lambda v: v in ("sqrt", "product"), "sqrt or product"),
    "alpha": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "min_gap": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "max_motion_drop": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


# ---------------------------------------------------------------- settings


def loop_settings(cfg: Any, rounds: int | None, source: str) -> Any:
    """The validated ``loop:`` block, ``--rounds`` applied."""
    settings = validate(cfg.get("loop"), LoopSchema, "loop", source)
    if rounds is not None:
        settings.rounds = rounds
    check_values(settings, "loop", LOOP_RULES, source)
    check_values(settings.pairs, "loop.pairs", PAIRS_RULES, source)
    return settings


def training_config(cfg: Any, settings: Any, registry: Any, source: str) -> Any:
    """The config the verbs run with: ``cfg`` without ``loop:``; keys the loop sets per round are refused."""
    model = cfg.get("model") or {}
    for key in ("trainable_weights", "init_weights"):
        if model.get(key):
            raise UserError(f"{source}: model.{key} is set ({model.get(key)}); the loop sets the starting weights of "
                            f"each round itself (loop.reference), so remove it")
    if settings.reference == "previous":
        finetune = model.get("finetune")
        if finetune is None:  # the backend's default
            schema = getattr(registry.get("model", model.get("name")), "schema", None)
            finetune = getattr(schema, "finetune", None) if schema is not None else None
        if finetune != "full":
            raise UserError(f"{source}: loop.reference=previous needs model.finetune=full (got {finetune!r}): a full "
                            f"fine-tune's weights are the whole network, so round r-1's model can be the reference of "
                            f"round r; LoRA rounds would stack adapters that one weights folder cannot hold. Use "
                            f"loop.reference=base with LoRA")
    train = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "loop"])
    return train


def split_prompts(entries: Sequence[tuple[str, str]], fraction: float) -> tuple[dict, dict]:
    """Training and held-out prompts, ``{id: prompt}`` each, split by prompt text (deterministically).

    The distinct texts are ordered by their sha256 and the first ``round(fraction * n)`` (at least one,
    at most n - 1) are held out; every entry of a held-out text leaves training. ``fraction`` 0 trains on
    every prompt and evaluates on every distinct one (on other seeds).
    """
    texts = list(dict.fromkeys(text for _, text in entries))
    first_id = {}
    for pid, text in entries:
        first_id.setdefault(text, pid)
    if fraction == 0:
        return dict(entries), {first_id[t]: t for t in texts}
    if len(texts) < 2:
        raise UserError(f"loop.holdout_fraction={fraction}: the prompts hold {len(texts)} distinct prompt(s); "
                        f"holding some out needs at least 2 (or set loop.holdout_fraction=0)")
    n = min(len(texts) - 1, max(1, round(fraction * len(texts))))
    held = set(sorted(texts, key=lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())[:n])
    return ({pid: t for pid, t in entries if t not in held}, {first_id[t]: t for t in texts if t in held})


# ---------------------------------------------------------------- the state of a run


class LoopState:
    """``OUT/loop_state.json``: the settings of the run and every finished step, written atomically."""

    def __init__(self, out: Path, settings: dict):
        self.path = out / STATE
        self.data = read_json(self.path) if self.path.is_file() else {"version": 1, "settings": settings, "done": {}}
        before = self.data.get("settings", {})
        changed = sorted(k for k in set(before) | set(settings)
                         if k not in RERUN_MAY_CHANGE and before.get(k) != settings.get(k))
        if changed:
            details = "; ".join(_difference(k, before.get(k), settings.get(k)) for k in changed)
            raise UserError(f"{self.path}: this loop ran with other settings ({details}); its rounds were made with "
                            f"those: rerun with them, or give another --out")
        self.data["settings"] = settings
        self.save()

    def done(self, step: str) -> bool:
        return step in self.data["done"]

    def mark(self, step: str, **info: Any) -> None:
        self.data["done"][step] = info
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def _difference(key: str, before: Any, now: Any) -> str:
    if isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        return "; ".join(_difference(f"{key}.{k}", before.get(k), now.get(k)) for k in keys)
    return f"{key}: {before!r} then, {now!r} now"


def promote_weights(run_weights: Path, target: Path, reference: str) -> Path:
    """A round's weights as a folder the base config samples and evaluates: ``run/weights/last`` linked (or
    copied) to ``round_<r>/weights/last``. With ``reference: previous`` the run was trained on top of
    ``model.init_weights`` (round r-1's full network); a full fine-tune's weights are the whole network, so
    the copy records no init weights (the run's own record stays in ``run/``)."""
    meta = read_json(run_weights / "trainable.json")
    with atomic_directory(target) as tmp:
        for source in sorted(run_weights.rglob("*")):
            dest = tmp / source.relative_to(run_weights)
            if source.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            elif source.name != "trainable.json":
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, dest)
                except OSError:  # another file system, or no hard links
                    shutil.copy2(source, dest)
        if reference == "previous":
            if meta.get("finetune") != "full":
                raise UserError(f"{run_weights}: loop.reference=previous needs full fine-tune weights, these are "
                                f"{meta.get('finetune')!r}")
            meta = {**meta, "loop_trained_on": meta.get("init_weights"), "init_weights": None}
        write_text_atomic(tmp / "trainable.json", _json(meta))
    return target


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)


# ---------------------------------------------------------------- the loop


def _scorer_args(names: Sequence[str], options: dict, weights: dict) -> list[str]:
    args = ["--scorers", ",".join(names)]
    for scorer, opts in options.items():
        if scorer in names:
            args += [a for k, v in opts.items() for a in ("--option", f"{scorer}.{k}={v}")]
    for name, w in weights.items():
        args += ["--weight", f"{name}={w}"]
    return args


def run_loop(config: str | Path, prompts: str | Path, out: str | Path, rounds: int | None = None,
             overrides: Sequence[str] = (), *, run: Callable[[list[str]], int],
             run_apart: Callable[[list[str]], int] | None = None, registry: Any = None,
             progress: Callable[[str], None] = print) -> dict:
    """Run (or resume) the rounds; returns the loop summary (also ``OUT/report/loop.json``).

    ``run`` runs one ``videotuna`` command line and returns its exit status (the CLI passes its ``main``).
    ``run_apart`` runs one in a process of its own (the CLI: ``python -m videotuna_dpo``); training on several
    processes goes through it, since Lightning starts the other ranks by running again the command that this
    process was started with: a loop run in-process would be rerun whole on every rank, each redoing its steps.
    """
    from videotuna_dpo.eval_callback import eval_settings
    from videotuna_dpo.pipeline.evaluate import compare_scores
    from videotuna_dpo.scoring.omniscore import NO_WEIGHTS_DIMENSIONS
    from videotuna_dpo.pipeline.loop_report import round_record, write_loop_report
    from videotuna_dpo.registry import Registry
    from videotuna_dpo.strategy import training_processes

    source = str(config)
    cfg = load_config(config, overrides)
    registry = registry or Registry.load(cfg.get("plugins"))
    settings = loop_settings(cfg, rounds, source)
    train_cfg = training_config(cfg, settings, registry, source)
    processes = training_processes(train_cfg, source)
    if processes > 1 and run_apart is None:
        raise UserError(f"{source}: training runs on {processes} processes, and this loop has no way to start "
                        f"`videotuna train` in a process of its own (run_apart)")
    evals = eval_settings(train_cfg, source)
    scorers = list(evals.scorers or NO_WEIGHTS_DIMENSIONS)
    judges = [str(j) for j in evals.judges]
    check_judges(scorers, judges, f"{source}: eval.judges")
    out = Path(out).resolve()
    check_writable_dir(out, f"--out {out}")
    entries = load_prompt_file(prompts)
    train_prompts, heldout = split_prompts(entries, settings.holdout_fraction)

    plain = OmegaConf.to_container(settings, resolve=True)
    state = LoopState(out, {**plain, "config": OmegaConf.to_container(train_cfg, resolve=False),
                            "prompts": train_prompts, "heldout": heldout})
    cfg_path = out / "config.yaml"
    text = OmegaConf.to_yaml(train_cfg)
    if not cfg_path.is_file() or cfg_path.read_text() != text:
        write_text_atomic(cfg_path, text)
    for name, data in (("train.json", train_prompts), ("heldout.json", heldout)):
        path = out / "prompts" / name
        if not path.is_file() or read_json(path) != data:
            write_json_atomic(path, data)

    score_names = scorers + ([MOTION_MEASURE] if MOTION_MEASURE not in scorers else [])
    options = OmegaConf.to_container(evals.options, resolve=True)
    weights = {k: float(v) for k, v in evals.weights.items()}
    p = settings.pairs
    pair_args = ["--strategy", p.strategy, "--alpha", str(p.alpha), "--min-gap", str(p.min_gap), "--mode", p.mode]
    if p.motion_guard:
        pair_args += ["--motion-guard", "--max-motion-drop", str(p.max_motion_drop)]
    cfg_arg = ["--config", str(cfg_path)]
    n_train = len(train_prompts)
    summary_rounds: list[dict] = []
    stopped_after = None
    start = time.time()

    for r in range(1, settings.rounds + 1):
        rd = out / f"round_{r}"
        prev = out / f"round_{r - 1}" / "weights" / "last" if r > 1 else None
        run_paths = [f"output_dir={rd / 'run'}", f"data.train_data={rd / 'pairs' / 'train_data.yaml'}",
                     f"data.cache={rd / 'cache'}"]
        start_weights = [] if prev is None else [
            f"model.{'init_weights' if settings.reference == 'previous' else 'trainable_weights'}={prev}"]
        resume = ["--resume", "last"] if (rd / "run" / "checkpoints" / "last.ckpt").is_file() \
            and not (rd / "run" / "run.json").is_file() else []
        seed = settings.seed + (r - 1) * n_train * settings.samples
        all_weights = [str(out / f"round_{i}" / "weights" / "last") for i in range(1, r + 1)]
        steps: list[tuple[str, list[str] | Callable[[], None], Path]] = [
            ("generate", ["generate", *cfg_arg, "--prompts", str(out / "prompts" / "train.json"), "--num-samples",
                          str(settings.samples), "--out", str(rd / "samples"), "--seed", str(seed),
                          *(["--weights", str(prev)] if prev else [])], rd / "samples" / "prompts.json"),
            ("score", ["score", "--videos", str(rd / "samples"), "--out", str(rd / "scores.jsonl"),
                       *_scorer_args(score_names, options, weights), "--batch-size", str(settings.score_batch_size),
                       "--no-progress"], rd / "scores.jsonl"),
            ("pairs", ["pairs", "--scores", str(rd / "scores.jsonl"), "--out", str(rd / "pairs"), *pair_args],
             rd / "pairs" / "train_data.yaml"),
            ("cache", ["cache", *cfg_arg, "--data", str(rd / "pairs"), "--out", str(rd / "cache"), *run_paths],
             rd / "cache" / "index.json"),
            ("train", ["train", "--strategy", "dpo", *cfg_arg, *resume, *run_paths, *start_weights],
             rd / "run" / "run.json"),
            ("weights", lambda rd=rd: promote_weights(rd / "run" / "weights" / "last", rd / "weights" / "last",
                                                     settings.reference), rd / "weights" / "last" / "trainable.json"),
            ("eval", ["eval", *cfg_arg, "--prompts", str(out / "prompts" / "heldout.json"), "--weights", *all_weights,
                      "--num-samples", str(settings.eval_samples), "--out", str(out / "eval"), "--seed",
                      str(settings.eval_seed), "--no-progress"], out / "eval" / "scores" / f"round_{r}.jsonl"),
            ("compare", lambda r=r, rd=rd: _compare_round(out, r, judges, compare_scores), rd / "eval.json"),
        ]
        finished = state.done(f"round_{r}/compare")
        for name, action, output in steps:
            key = f"round_{r}/{name}"
            if state.done(key):
                # A finished round's files may be cleaned up (its cache, say), but for the weights the next round
                # starts from; an unfinished round needs what its finished steps made.
                needed = not finished or (name == "weights" and r < settings.rounds)
                if needed and not output.exists():
                    raise UserError(f"{output} is missing, but {state.path} records round {r}'s {name} step as "
                                    f"finished and later steps were made from it; restore it, or run the loop "
                                    f"again with another --out")
                continue
            progress(f"\n== loop round {r}/{settings.rounds}: {name} ==")
            began = time.time()
            if callable(action):
                action()
            else:
                code = (run_apart if name == "train" and processes > 1 else run)(list(action))
                if code != 0:
                    raise UserError(f"loop round {r}: `videotuna {name}` failed (exit status {code}); fix the cause "
                                    f"and rerun the loop, which resumes at this step")
            state.mark(key, seconds=round(time.time() - began, 1))
        record = round_record(out, r)
        summary_rounds.append(record)
        write_loop_report(out, _summary(out, settings, scorers, judges, summary_rounds, None, start))
        if record["possible_reward_hacking"] and settings.stop_on_hacking:
            stopped_after = r
            progress(f"loop: round {r} is marked possible reward hacking and loop.stop_on_hacking is true: "
                     f"no further rounds")
            break
    summary = _summary(out, settings, scorers, judges, summary_rounds, stopped_after, start)
    summary["report"] = write_loop_report(out, summary)
    return summary


def _compare_round(out: Path, r: int, judges: Sequence[str], compare_scores: Callable) -> None:
    """``round_<r>/eval.json``: round r against the base (eval's table) and against round r-1, with the guards."""
    scores = out / "eval" / "scores"
    vs = {"base": compare_scores(scores / "base.jsonl", scores / f"round_{r}.jsonl")}
    if r > 1:
        vs[f"round_{r - 1}"] = compare_scores(scores / f"round_{r - 1}.jsonl", scores / f"round_{r}.jsonl")
    for against, table in vs.items():
        table["guards"] = check_table(table, judges, f"round_{r}", against)
    from videotuna_dpo.pipeline.report import json_safe

    write_json_atomic(out / f"round_{r}" / "eval.json", json_safe({"round": r, "against": vs}))


def _summary(out: Path, settings: Any, scorers: list[str], judges: list[str], rounds: list[dict],
             stopped_after: int | None, start: float) -> dict:
    warnings = [w for rec in rounds for w in rec["warnings"]]
    return {
        "out": str(out), "settings": OmegaConf.to_container(settings, resolve=True), "scorers": scorers,
        "judges": judges, "rounds": rounds, "rounds_done": len(rounds), "stopped_after": stopped_after,
        "possible_reward_hacking": any(rec["possible_reward_hacking"] for rec in rounds),
        "motion_drop": any(rec["motion_drop"] for rec in rounds), "warnings": warnings,
        "seconds": round(time.time() - start, 1),
    }
