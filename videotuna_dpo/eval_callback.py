"""The ``eval:`` block of a config and the training callback of ``eval_every_n_steps``: sample a few prompts with
the policy and log ``eval/*``. The block also sets the scorers of ``videotuna eval``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch

from videotuna_dpo.config import plain, validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.sampling import GenerateSchema, sampler_kwargs
from videotuna_dpo.scoring.build import build_scorers, omniscore_config, score_batch, unscorable_reason
from videotuna_dpo.scoring.omniscore import MOTION_SCORERS, NO_WEIGHTS_DIMENSIONS, omniscore, omniscore_dimensions

# A run whose implicit accuracy reached this while a judge fell below its step-0 value is pointed out.
OVERFIT_ACC = 0.9


@dataclass
class EvalSchema:
    """The optional ``eval:`` block of a config (``videotuna eval`` and the training callback)."""

    scorers: Optional[list[str]] = None  # default: NO_WEIGHTS_DIMENSIONS
    judges: list[str] = field(default_factory=list)  # scorers training never used: reported apart, never in OmniScore
    options: dict[str, Any] = field(default_factory=dict)  # {scorer: {key: value}}, as --option
    weights: dict[str, float] = field(default_factory=dict)  # OmniScore weights, as `videotuna score --weight`
    score_batch_size: int = 4
    prompts: list[str] = field(default_factory=list)  # the training callback's few prompts
    seeds: list[int] = field(default_factory=lambda: [0])  # the callback samples every prompt with each seed


def check_judges(training: Sequence[str], judges: Sequence[str], where: str = "eval.judges") -> None:
    """Refuse a judge that is also a training scorer (a judge must be a scorer the training never used)."""
    both = [j for j in judges if j in training]
    if both:
        raise UserError(f"{where}: {', '.join(both)} also score the training (eval.scorers: {', '.join(training)}); "
                        f"a judge must be a scorer the training never used")
    if len(set(judges)) != len(judges):
        raise UserError(f"{where}: lists a judge twice: {', '.join(judges)}")


def measured_apart(training: Sequence[str], judges: Sequence[str], where: str = "eval.judges") -> list[str]:
    """Check ``judges`` against the training scorers; -> the scorers evaluation also runs but keeps out of the
    OmniScore: the motion measures and the judges, less any that are training scorers."""
    check_judges(training, judges, where)
    return [n for n in dict.fromkeys([*MOTION_SCORERS, *judges]) if n not in training]


def eval_settings(cfg: Any, source: str = "<config>") -> Any:
    """The config's ``eval:`` block validated against :class:`EvalSchema` (defaults when absent)."""
    return validate(cfg.get("eval") if cfg is not None else None, EvalSchema, "eval", source)


class EvalCallback(L.Callback):
    """Every N training steps: sample a few prompts with the policy, score them, log ``eval/*``.

    Logs ``eval/omniscore``, ``eval/quality``, ``eval/semantic`` (when present), ``eval/<dimension>``
    (normalised) and ``eval/raw/<scorer>`` for scorers that are no OmniScore dimension, at the global step;
    runs once before training too, as the baseline. Judges (``eval.judges``: scorers training never used) are
    logged raw as ``eval/judge/<name>``, and the motion measures (``dynamic_degree``, ``motion_magnitude``) as
    ``eval/raw/<name>`` when they are not among the scorers; neither joins the OmniScore. When
    ``train/implicit_acc`` has reached 0.9 and a judge has fallen below its step-0 value, a line says so: the
    policy separates its training pairs while getting worse on what they did not measure.
    """

    def __init__(
        self,
        every_n_steps: int,
        prompts: Sequence[str],
        seeds: Sequence[int] | int = (0,),
        scorers: Sequence[str] | None = None,
        generate_kwargs: Mapping[str, Any] | None = None,
        scorer_options: Mapping[str, Mapping[str, Any]] | None = None,
        omniscore_weights: Mapping[str, float] | None = None,
        at_start: bool = True,
        registry: Any = None,
        judges: Sequence[str] = (),
        source: str | None = None,
    ):
        if every_n_steps < 1:
            raise UserError(f"eval_every_n_steps must be at least 1, got {every_n_steps}")
        if not prompts:
            raise UserError("the eval callback needs at least one prompt (eval.prompts)")
        self.every = int(every_n_steps)
        self.prompts = list(prompts)
        self.seeds = [int(seeds)] if isinstance(seeds, int) else [int(s) for s in seeds]
        self.scorer_names = list(scorers or NO_WEIGHTS_DIMENSIONS)
        self.judges = [str(j) for j in judges]
        # Scored with the rest, reported apart: the judges and the motion measures not among the scorers.
        self.measured = measured_apart(self.scorer_names, self.judges,
                                       f"{source}: eval.judges" if source else "eval.judges")
        self.generate_kwargs = dict(generate_kwargs or {})
        self.batch_size = int(self.generate_kwargs.pop("batch_size", 4))
        self.scorer_options = {k: dict(v) for k, v in (scorer_options or {}).items()}
        self.omniscore_weights = dict(omniscore_weights or {})
        self.at_start = at_start
        self.registry = registry
        self._scorers: dict | None = None
        self._said: set[str] = set()
        self.history: list[dict] = []  # {"step", "omniscore", ...} per evaluation

    def _build(self, device: str) -> None:
        self._scorers = build_scorers(self.scorer_names, device, self.scorer_options, self.registry)
        self._config = omniscore_config(self._scorers, self.omniscore_weights)
        self._measured = build_scorers(self.measured, device, self.scorer_options, self.registry)

    @torch.no_grad()
    def measure(self, backend: Any, device: str) -> dict[str, float]:
        """Mean OmniScore, quality, semantic and normalised dimensions of the policy's samples."""
        if self._scorers is None:
            self._build(device)
        jobs = [(p, s) for s in self.seeds for p in self.prompts]
        videos = []
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            videos.append(backend.generate([p for p, _ in batch], seed=[s for _, s in batch],
                                           **self.generate_kwargs).float().cpu())  # [B, F, C, H, W] in [0, 1]
        clip = torch.cat(videos)
        texts = [p for p, _ in jobs]
        # One shared decode and optical flow for the training scorers and the ones reported apart.
        scored = score_batch({**self._scorers, **self._unskipped(clip.shape)}, clip.to(device), texts, None)
        raw = {n: scored[n] for n in self._scorers}
        apart = {n: v for n, v in scored.items() if n not in self._scorers}
        dimensions = omniscore_dimensions(raw, self._config)
        totals: dict[str, list[float]] = {}
        for i in range(len(jobs)):
            values = {f"raw/{n}": float(v[i]) for n, v in raw.items() if n not in dimensions}
            values.update({(f"judge/{n}" if n in self.judges else f"raw/{n}"): float(v[i]) for n, v in apart.items()})
            if dimensions:
                agg = omniscore({n: float(v[i]) for n, v in raw.items()}, self._config)
                values.update({"omniscore": agg["omniscore"], **agg["normalized"]})
                for group in ("quality", "semantic"):
                    if agg[group] is not None:
                        values[group] = agg[group]
            for name, value in values.items():
                totals.setdefault(name, []).append(value)
        return {name: sum(v) / len(v) for name, v in totals.items()}

    def _unskipped(self, shape: Sequence[int]) -> dict[str, Any]:
        """The measured scorers, less a motion measure (not asked for) that cannot score videos of ``shape``
        (said once); a judge that cannot fails in the scorer, naming why."""
        kept = {}
        for name, scorer in self._measured.items():
            problem = None if name in self.judges else unscorable_reason(scorer, shape[1], shape[-2], shape[-1])
            if problem is None:
                kept[name] = scorer
            elif name not in self._said:
                self._said.add(name)
                print(f"eval callback: {name} left out: {problem}")
        return kept

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        modes = {m: m.training for m in pl_module.modules()}
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # evaluation must not shift the training noise
                pl_module.eval()
                metrics = self.measure(pl_module.backend, str(pl_module.device))
        finally:
            for module, mode in modes.items():
                module.train(mode)
        step = trainer.global_step
        self.history.append({"step": step, **metrics})
        logged = {f"eval/{name}": value for name, value in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=step)
        for name, value in logged.items():  # visible to other callbacks (checkpoint monitors, progress bar)
            trainer.callback_metrics[name] = torch.tensor(value)
        warning = self.over_optimisation(trainer.callback_metrics.get("train/implicit_acc"))
        if warning:
            print(warning)

    def over_optimisation(self, implicit_acc: Any) -> str | None:
        """The line for the latest evaluation when the implicit accuracy is high and a judge fell since step 0."""
        if len(self.history) < 2 or implicit_acc is None or float(implicit_acc) < OVERFIT_ACC:
            return None
        first, last = self.history[0], self.history[-1]
        fell = [f"{j} {first[f'judge/{j}']:.4g} -> {last[f'judge/{j}']:.4g}" for j in self.judges
                if last[f"judge/{j}"] < first[f"judge/{j}"]]
        if not fell:
            return None
        return (f"eval at step {last['step']}: train/implicit_acc {float(implicit_acc):.2f} while judge "
                f"{'; '.join(fell)} since step {first['step']}: the policy separates its training pairs but gets "
                f"worse on what they did not measure, the sign of over-optimisation (see README, reading the logs)")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_start:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and not any(h["step"] == step for h in self.history):
            self._run(trainer, pl_module)


def eval_callback(cfg: Any, source: str = "<config>", registry: Any = None) -> EvalCallback | None:
    """The training callback a config asks for (``eval_every_n_steps`` > 0 and ``eval.prompts``), else None."""
    every = int(cfg.get("eval_every_n_steps", 0) or 0)
    if every <= 0:
        return None
    settings = eval_settings(cfg, source)
    if not settings.prompts:
        raise UserError(f"{source}: eval_every_n_steps is {every} but eval.prompts is empty; list a few prompts")
    gen = validate(cfg.get("generate"), GenerateSchema, "generate", source)
    kwargs = {**sampler_kwargs(gen), "batch_size": gen.batch_size}
    return EvalCallback(every, list(settings.prompts), list(settings.seeds), settings.scorers, kwargs,
                        scorer_options=plain(settings.options), omniscore_weights=plain(settings.weights),
                        registry=registry, judges=list(settings.judges), source=source)
