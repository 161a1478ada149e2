"""The DPO strategy: a LightningModule over any backend, and the run that trains it."""

from __future__ import annotations

import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from omegaconf import OmegaConf

from videotuna_dpo.config import NON_NEGATIVE, POSITIVE, check_kwargs, check_values, validate
from videotuna_dpo.data.order import generator, seeded
from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.eval_callback import eval_callback
from videotuna_dpo.fileio import check_writable_dir, write_json_atomic, write_text_atomic
from videotuna_dpo.jobs import check_launch_environment
from videotuna_dpo.losses import LOSS_TYPES, per_sample_mse, preference_loss
from videotuna_dpo.models.finetune import without_reference_copy
from videotuna_dpo.models.flow_matching import TIMESTEP_SAMPLING
from videotuna_dpo.registry import call_with_optional


@dataclass
class DPOSchema:
    beta: float = 5000.0
    loss_type: str = "sigmoid"  # sigmoid (Diffusion-DPO) | hinge | ipo
    sft_weight: float = 0.0
    share_noise: bool = True  # winner and loser share noise and timestep; false = official code
    disable_dropout: bool = True  # dropout off in policy and reference: equal at step 0, no noise times beta
    uncond_prob: float = 0.0  # caption dropout: the pair's caption -> "" with this probability (official VC2: 0.2)
    # Flow-matching backends only: beta on the velocity error as is (constant), or times (1 - s)^2, which
    # makes it Diffusion-DPO's beta on the implied noise error (eps_equivalent).
    beta_schedule: str = "constant"
    timestep_sampling: Optional[str] = None  # flow-matching: uniform | logit_normal | mode; None = uniform
    logit_mean: float = 0.0  # logit_normal's mean and std, mode's scale (diffusers' names)
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # A no-grad pre-pass stores the reference's errors on reference_draws draws per pair next to the latent cache
    # (data.cache/reference); training then runs the policy only (a full fine-tune builds no frozen copy).
    precompute_reference: bool = False
    reference_draws: int = 4  # K: epoch e trains each pair on its draw e mod K


@dataclass
class OptimizerSchema:
    name: str = "adamw"  # adamw (torch) | adamw_8bit (bitsandbytes' AdamW8bit: 8-bit moments, about 1/4 the state)
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    warmup_steps: int = 0


@dataclass
class CheckpointSchema:
    every_n_train_steps: int = 500  # Lightning checkpoint (--resume) and weights export cadence
    save_top_k: int = -1
    export_weights: bool = True  # also write weights/step-N (safetensors) that `generate` loads


@dataclass
class LightningSchema:
    trainer: dict[str, Any] = field(default_factory=dict)  # passed to lightning.Trainer
    checkpoint: CheckpointSchema = field(default_factory=CheckpointSchema)


@dataclass
class TrainSchema:
    plugins: Optional[list[str]] = None
    seed: int = 42
    output_dir: str = "runs/dpo"
    model: dict[str, Any] = field(default_factory=dict)  # validated by the chosen backend
    data: dict[str, Any] = field(default_factory=dict)  # validated by the chosen datamodule
    generate: dict[str, Any] = field(default_factory=dict)  # sampler settings of `videotuna generate`
    eval: dict[str, Any] = field(default_factory=dict)  # `videotuna eval` and the training callback
    eval_every_n_steps: int = 0  # log eval/omniscore every N steps from eval.prompts x eval.seeds; 0 = off
    dpo: DPOSchema = field(default_factory=DPOSchema)
    optimizer: OptimizerSchema = field(default_factory=OptimizerSchema)
    lightning: LightningSchema = field(default_factory=LightningSchema)


BETA_SCHEDULES = ("constant", "eps_equivalent")
DPO_RULES = {"beta": POSITIVE, "sft_weight": NON_NEGATIVE,
             "uncond_prob": (lambda v: 0 <= v < 1, "a probability in [0, 1)"),
             "loss_type": (lambda v: v in LOSS_TYPES, f"one of {', '.join(LOSS_TYPES)}"),
             "beta_schedule": (lambda v: v in BETA_SCHEDULES, f"one of {', '.join(BETA_SCHEDULES)}"),
             "timestep_sampling": (lambda v: v is None or v in TIMESTEP_SAMPLING,
                                   f"one of {', '.join(TIMESTEP_SAMPLING)} (or null)"),
             "logit_std": POSITIVE,
             "reference_draws": (lambda v: v >= 1, "an integer >= 1")}
OPTIMIZERS = ("adamw", "adamw_8bit")
OPTIMIZER_RULES = {"name": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"), "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "eps": POSITIVE,
                   "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
                   "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1)")}
TRAINER_INTS = ("max_steps", "max_epochs", "accumulate_grad_batches", "log_every_n_steps", "num_nodes")


def check_training_values(dpo: Any, optimizer: Any, where: str = "", source: str = "<config>") -> None:
    """dpo.* and optimizer.* in range, before any model loads (both entrances)."""
    prefix = f"{where}." if where else ""
    check_values(dpo, f"{prefix}dpo", DPO_RULES, source)
    check_values(optimizer, f"{prefix}optimizer", OPTIMIZER_RULES, source)
    if optimizer.name == "adamw_8bit":
        bitsandbytes_optim(f"{prefix}optimizer.name")


def bitsandbytes_optim(key: str = "optimizer.name") -> Any:
    """``bitsandbytes.optim``, or a UserError saying how to install it (it is optional: GPU-oriented)."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise UserError(f"{key}=adamw_8bit needs the bitsandbytes package, which is not importable ({first_line(exc)}): "
                        f"pip install bitsandbytes (8-bit optimizers run on a CUDA GPU), or set {key}=adamw") from None
    return bitsandbytes.optim


def check_trainer_kwargs(trainer: dict[str, Any], source: str = "<config>") -> dict[str, Any]:
    """``lightning.trainer`` keys that Trainer accepts, the integer ones integers (``max_steps=lots`` refused)."""
    kwargs = check_kwargs(trainer, L.Trainer.__init__, "lightning.trainer", source)
    check_values(kwargs, "lightning.trainer",
                 {k: (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1, "an integer")
                  for k in TRAINER_INTS}, source)
    if "gradient_clip_val" in kwargs:
        check_values(kwargs, "lightning.trainer", {"gradient_clip_val": NON_NEGATIVE}, source)
    return kwargs


class DPOModule(L.LightningModule):
    """One step: encode the pair, shared noise and timestep, policy and reference errors, DPO loss."""

    def __init__(self, backend: Any, dpo: DPOSchema | Any, optimizer: OptimizerSchema | Any, seed: int | None = None):
        super().__init__()
        check_training_values(dpo, optimizer)
        self.backend = backend
        self.dpo = dpo
        self.optim = optimizer
        self.seed = torch.initial_seed() if seed is None else int(seed)  # steps draw from seeds derived from it
        if dpo.disable_dropout:
            disable_dropout(backend)
        configure_flow_matching(backend, dpo)
        # Only trainable tensors go into checkpoints; frozen weights come from model.pretrained.
        self.strict_loading = False

    # Latents and conditioning; a latent-cache batch carries them already.
    def _encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if "winner_latents" in batch:
            lat_w, lat_l, cond = batch["winner_latents"], batch["loser_latents"], batch["prompt_embeds"]
        else:
            latents = self.backend.encode_video(torch.cat([batch["winner"], batch["loser"]]))
            lat_w, lat_l = latents.chunk(2)
            cond = self.backend.encode_prompt(list(batch["caption"]))
        return lat_w, lat_l, self._drop_captions(batch, cond)

    def _drop_captions(self, batch: dict[str, Any], cond: Any) -> Any:
        """Caption dropout: each pair's conditioning -> the empty caption's with probability ``uncond_prob``.

        One draw per pair, so its winner and loser (which share ``cond``) are dropped together; a stored draw
        (``draw_drop``) brings its own decision.
        """
        p = self.dpo.uncond_prob
        if p <= 0:
            return cond
        if not isinstance(cond, torch.Tensor):
            raise UserError(f"dpo.uncond_prob needs tensor prompt conditioning; {type(self.backend).__name__} "
                            f"gives {type(cond).__name__}: set dpo.uncond_prob=0")
        if "draw_drop" in batch:
            drop = batch["draw_drop"].to(cond.device).bool()
        else:
            drop = torch.rand(cond.shape[0], device=cond.device) < p
        if not drop.any():
            return cond
        if "null_embeds" in batch:  # a latent-cache batch: the empty caption's embedding, cached
            null = batch["null_embeds"].to(cond)
        elif "winner_latents" in batch:
            raise UserError("dpo.uncond_prob > 0 needs the empty caption's embedding in the latent cache, which "
                            "this cache predates; run `videotuna cache` again on it to add it")
        else:
            null = self.backend.encode_prompt([""]).to(cond).expand_as(cond)
        return torch.where(drop.reshape(-1, *([1] * (cond.dim() - 1))), null, cond)

    def step_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """``(x0, noise, t, cond)`` of one step: winners in the first half, losers in the second.

        A batch with stored draws (``draw_seed``, ``draw_t``) takes each item's noise from its draw's seed and
        its timesteps as stored; otherwise both are drawn here from the global generator.
        """
        lat_w, lat_l, cond = self._encode(batch)
        b = lat_w.shape[0]
        if "draw_seed" in batch:
            seeds = [int(s) for s in batch["draw_seed"]]
            noise_w = draw_noise(seeds, lat_w, "winner")
            noise_l = noise_w if self.dpo.share_noise else draw_noise(seeds, lat_l, "loser")
            t_w, t_l = batch["draw_t"].to(lat_w.device).unbind(1)
        else:
            noise_w = torch.randn_like(lat_w)
            t_w = self.backend.sample_timesteps(b, lat_w.device)
            if self.dpo.share_noise:
                noise_l, t_l = noise_w, t_w
            else:
                noise_l, t_l = torch.randn_like(lat_l), self.backend.sample_timesteps(b, lat_l.device)
        cond2 = torch.cat([cond, cond]) if isinstance(cond, torch.Tensor) else cond + cond
        return torch.cat([lat_w, lat_l]), torch.cat([noise_w, noise_l]), torch.cat([t_w, t_l]), cond2

    def dpo_step(self, batch: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The loss output and the tensors the step used (noise, timesteps, errors) for one batch."""
        x0, noise, t, cond2 = self.step_inputs(batch)
        # One policy pass over winners and losers, and one reference pass unless its errors were stored.
        noisy = self.backend.add_noise(x0, noise, t)
        target = self.backend.target(x0, noise, t)

        model_err = per_sample_mse(self.backend.predict(noisy, t, cond2), target)
        if self.dpo.precompute_reference:
            if "ref_err_w" not in batch:
                raise UserError("dpo.precompute_reference: this batch carries no stored reference errors; train with "
                                "`videotuna train` on a latent cache (data.cache), whose pre-pass stores them")
            ref_err = torch.cat([batch["ref_err_w"], batch["ref_err_l"]]).to(model_err)
        else:
            with torch.no_grad(), self.backend.reference() as reference:
                ref_err = per_sample_mse(reference(noisy, t, cond2), target)
        if self.dpo.beta_schedule == "eps_equivalent":  # velocity errors -> the noise errors they imply
            scale = self.backend.eps_equivalent_weight(t).to(model_err)
            model_err, ref_err = model_err * scale, ref_err * scale
        model_err_w, model_err_l = model_err.chunk(2)
        ref_err_w, ref_err_l = ref_err.chunk(2)
        weights = batch.get("weight")
        out = preference_loss(
            model_err_w, model_err_l, ref_err_w, ref_err_l, beta=self.dpo.beta,
            loss_type=self.dpo.loss_type, weights=weights, sft_weight=self.dpo.sft_weight,
        )
        used = {"noise": noise, "t": t, "model_err_w": model_err_w.detach(), "model_err_l": model_err_l.detach(),
                "ref_err_w": ref_err_w, "ref_err_l": ref_err_l}
        return out, used

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out, used = self.seeded_step(batch, batch_idx)
        log_step(self, out, used)
        return out.loss

    def on_train_start(self) -> None:
        log_run_summary(self.trainer, self.dpo, self.optim)

    def sample_draws(self, seeds: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``[B, 2]`` (winner, loser) and caption-dropout decisions ``[B]`` of stored draws, each from its seed."""
        ts, drops = [], []
        for s in seeds:
            with seeded("draw", s):
                t_w = self.backend.sample_timesteps(1, device)
                t_l = t_w if self.dpo.share_noise else self.backend.sample_timesteps(1, device)
                drops.append(bool(torch.rand(()) < self.dpo.uncond_prob))
            ts.append(torch.cat([t_w, t_l]))
        return torch.stack(ts), torch.tensor(drops, device=device)

    @contextmanager
    def initial_reference(self):
        """The reference's ``predict`` for the pre-pass, which runs before the first step."""
        if getattr(self.backend, "reference_copy_skipped", False):
            yield self.backend.predict  # a full fine-tune without its frozen copy: at step 0 the policy is the reference
            return
        with self.backend.reference() as reference:
            yield reference

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """The pre-pass of ``dpo.precompute_reference``: each item's draw (seed, timesteps, dropout) and the
        reference's errors on its winner and loser ``[B, 2]``."""
        batch = dict(batch)
        seeds = [int(s) for s in batch["draw_seed"]]
        batch["draw_t"], batch["draw_drop"] = self.sample_draws(seeds, batch["winner_latents"].device)
        with torch.no_grad():
            x0, noise, t, cond2 = self.step_inputs(batch)
            target = self.backend.target(x0, noise, t)
            with self.initial_reference() as reference:
                ref_err = per_sample_mse(reference(self.backend.add_noise(x0, noise, t), t, cond2), target)
        ref_w, ref_l = ref_err.chunk(2)
        return {"pair_index": batch["pair_index"], "draw_index": batch["draw_index"], "seed": batch["draw_seed"],
                "t": batch["draw_t"].cpu(), "drop": batch["draw_drop"].cpu(), "ref_err": torch.stack([ref_w, ref_l], 1).cpu()}

    def seeded_step(self, batch: dict[str, Any], batch_idx: int, module: Any = None) -> tuple[Any, dict]:
        """``dpo_step`` with noise, timesteps, caption dropout and dropout drawn from a seed of (run seed,
        epoch, batch, rank), so a run resumed at this batch draws exactly what the uninterrupted run drew."""
        module = module or self
        with seeded("step", self.seed, module.current_epoch, batch_idx, module.global_rank):
            return self.dpo_step(batch)

    def configure_optimizers(self):
        params = self.backend.trainable_parameters()
        if not params:
            raise UserError("the backend has no trainable parameters (check model.finetune / model.lora)")
        adamw = bitsandbytes_optim().AdamW8bit if self.optim.name == "adamw_8bit" else torch.optim.AdamW
        opt = adamw(params, lr=self.optim.lr, betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay,
                    eps=self.optim.eps)
        warmup = max(0, int(self.optim.warmup_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trainable_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable_only(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        have, want = set(checkpoint["state_dict"]), self.trainable_names()
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise UserError(
                "the checkpoint does not hold this model's trainable weights "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}); "
                "resume with the same model config it was trained with"
            )


def draw_noise(seeds: list[int], like: torch.Tensor, which: str) -> torch.Tensor:
    """Noise shaped like ``like`` ``[B, ...]``, item b from ``seeds[b]`` alone (drawn on the CPU: any device agrees)."""
    return torch.stack([torch.randn(like.shape[1:], generator=generator("draw-noise", which, s)) for s in seeds]).to(like)


def configure_flow_matching(backend: Any, dpo: Any) -> None:
    """``dpo.timestep_sampling`` / ``dpo.beta_schedule`` reach a flow-matching backend; any other refuses them by name."""
    flow = hasattr(backend, "eps_equivalent_weight") and hasattr(backend, "set_timestep_sampling")
    for key, value, default in (("beta_schedule", dpo.beta_schedule, "constant"),
                                ("timestep_sampling", dpo.timestep_sampling, None)):
        if value != default and not flow:
            raise UserError(f"dpo.{key}={value!r} applies to flow-matching backends (wan, hunyuanvideo, toy_flow); "
                            f"{type(backend).__name__} trains with its own noise schedule: remove dpo.{key}")
    if flow and dpo.timestep_sampling is not None:
        backend.set_timestep_sampling(dpo.timestep_sampling, dpo.logit_mean, dpo.logit_std, dpo.mode_scale)


def run_summary(trainer: Any, dpo: Any, optim: Any) -> dict[str, Any]:
    """The global batch in pairs (per device x devices x accumulation), beta as the loss applies it, and the lr."""
    per_device = getattr(trainer.train_dataloader, "batch_size", None)
    devices, accumulation = int(trainer.world_size), int(trainer.accumulate_grad_batches)
    return {"pairs_per_device": per_device, "devices": devices, "accumulate_grad_batches": accumulation,
            "global_batch_pairs": per_device * devices * accumulation if per_device else None,
            "beta": float(dpo.beta), "beta_schedule": dpo.beta_schedule, "loss_type": dpo.loss_type,
            "lr": float(optim.lr), "warmup_steps": int(optim.warmup_steps)}


BETA_MEANING = {"constant": "on the per-sample error as the backend predicts it (noise, v or velocity)",
                "eps_equivalent": "x (1 - s)^2 on the velocity error, i.e. Diffusion-DPO's beta on the implied noise error"}


def log_run_summary(trainer: Any, dpo: Any, optim: Any) -> dict[str, Any]:
    """Say once, at the start of training, what a step is: printed by rank 0 and given to the logger's hparams."""
    summary = run_summary(trainer, dpo, optim)
    if trainer.is_global_zero:
        per_device = summary["pairs_per_device"] if summary["pairs_per_device"] is not None else "?"
        warmup = f", reached after a linear warmup of {summary['warmup_steps']} steps" if summary["warmup_steps"] else ""
        print(f"DPO training: global batch {summary['global_batch_pairs'] or '?'} pairs ({per_device} per device x "
              f"{summary['devices']} device(s) x {summary['accumulate_grad_batches']} accumulation); beta "
              f"{summary['beta']:g} {BETA_MEANING.get(summary['beta_schedule'], summary['beta_schedule'])} "
              f"(loss {summary['loss_type']} of -beta/2 x [(policy - reference error) of the winner - of the loser]); lr {summary['lr']:g} per "
              f"optimizer step on the mean over the global batch, not scaled by it{warmup}")
    if trainer.logger is not None:
        trainer.logger.log_hyperparams({f"run/{k}": v for k, v in summary.items()})
    return summary


def log_step(module: Any, out: Any, used: dict[str, torch.Tensor]) -> None:
    """Log one DPO step's loss and diagnostics on ``module`` (a LightningModule of either Lightning namespace)."""
    b = used["t"].shape[0] // 2
    module.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=b)
    module.log("train/implicit_acc", out.implicit_acc, prog_bar=True, batch_size=b)
    module.log("train/reward_margin", out.reward_margin, prog_bar=True, batch_size=b)
    module.log_dict(
        {
            "train/reward_w": out.reward_w,
            "train/reward_l": out.reward_l,
            "train/sft_loss": out.sft_loss,
            "train/model_err_w": used["model_err_w"].mean(),
            "train/model_err_l": used["model_err_l"].mean(),
            "train/ref_err_w": used["ref_err_w"].mean(),
            "train/ref_err_l": used["ref_err_l"].mean(),
            "train/lr": float(module.trainer.optimizers[0].param_groups[0]["lr"]),
        },
        batch_size=b,
    )


def keep_trainable_only(module: torch.nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop frozen tensors from a Lightning checkpoint: they come from the base weights, not the run."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def disable_dropout(module: torch.nn.Module) -> int:
    """Set ``p = 0`` on every dropout layer inside ``module`` (as TRL does for DPO); returns how many."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    for m in layers:
        m.p = 0.0
    return len(layers)


class ExportCadence:
    """When to write ``weights/step-N`` (every N optimizer steps, once each, never step 0) and ``weights/last``.

    Shared by the Lightning callback of our CLI and the VideoTuna entrance's ``pytorch_lightning`` one.
    """

    def __init__(self, directory: str | Path, every_n_steps: int):
        self.directory = Path(directory)
        self.every = int(every_n_steps)
        self.last_exported: int | None = None

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        # Called per micro-batch: under gradient accumulation global_step repeats; export each step once.
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self.last_exported:
            self.last_exported = step
            if trainer.is_global_zero:
                pl_module.backend.save_trainable(self.directory / f"step-{step}")

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            pl_module.backend.save_trainable(self.directory / "last")


class ExportTrainableWeights(ExportCadence, L.Callback):
    """Writes ``weights/step-N`` every N steps and ``weights/last`` at the end (safetensors)."""


SHARDED = ("fsdp", "deepspeed_stage_3")  # strategies that shard the parameters themselves


def check_engine(trainer_kwargs: dict[str, Any], model_cfg: Any, dpo: Any, source: str = "<config>") -> None:
    """The distributed engine the config asks for, checked before any model loads: a strategy the machine
    cannot run (FSDP or DeepSpeed without a GPU, DeepSpeed not installed) or a reference that a sharded
    strategy would replicate whole on every GPU is refused by name, not after minutes of loading."""
    strategy = trainer_kwargs.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    sharded = name.startswith(SHARDED) or name in ("FSDPStrategy", "DeepSpeedStrategy")
    full = model_cfg.get("finetune") == "full"
    if sharded and full and model_cfg.get("reference_on_cpu") and not dpo.get("precompute_reference"):
        raise UserError(f"{source}: lightning.trainer.strategy={name} with model.reference_on_cpu=true: the frozen "
                        f"reference copy would be moved whole onto every GPU for each reference pass, which is what "
                        f"{name} shards the model to avoid. Set dpo.precompute_reference=true (the reference's errors "
                        f"are computed once before training and no copy is held), or model.reference_on_cpu=false "
                        f"(the copy stays on the GPUs, sharded with the policy)")
    trainer, settings = probe_trainer(trainer_kwargs, source)
    check_launch_environment(trainer.num_devices * trainer.num_nodes, f"{source}: lightning.trainer ({settings})")


def probe_trainer(trainer_kwargs: dict[str, Any], source: str = "<config>") -> tuple[L.Trainer, str]:
    """A Trainer made with the run's engine settings, and those settings as text.

    Lightning checks accelerator, strategy, precision and the engine's package when a Trainer is made; made with the
    run's settings (nothing launches before fit), its refusal comes before any model loads, and it resolves how many
    processes the run will have (``devices: auto`` or ``-1`` count the GPUs)."""
    import logging

    probe = {k: v for k, v in trainer_kwargs.items() if k in ("accelerator", "strategy", "devices", "num_nodes",
                                                             "precision", "plugins")}
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    settings = ", ".join(f"{k}={v}" for k, v in probe.items()) or "the defaults"
    try:
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, **probe)
    except Exception as exc:  # Lightning's refusals are ValueError, MisconfigurationException, ImportError...
        raise UserError(f"{source}: lightning.trainer ({settings}) cannot run here: {first_line(exc, 400)}") from None
    finally:
        quiet.setLevel(level)
    return trainer, settings


def training_processes(cfg: Any, source: str = "<config>") -> int:
    """How many processes ``videotuna train`` with ``cfg`` runs (devices x nodes, as Lightning resolves them)."""
    trainer_cfg = OmegaConf.select(cfg, "lightning.trainer", default=None) or {}
    kwargs = check_trainer_kwargs(OmegaConf.to_container(OmegaConf.create(trainer_cfg), resolve=True), source)
    trainer, _ = probe_trainer(kwargs, source)
    return trainer.num_devices * trainer.num_nodes


def wrap_blocks(backend: Any, trainer_kwargs: dict[str, Any]) -> None:
    """``strategy: fsdp`` (or ``fsdp_cpu_offload``) -> Lightning's FSDPStrategy wrapping each block of the denoisers.

    Wrapped only at the root, FSDP gathers the whole model for every forward and saves nothing at the peak. The
    blocks are the classes the network names in ``_no_split_modules`` (diffusers' and Wan's own list of the layers
    that must stay whole, which accelerate shards by too) or, for a network without that list, the backend in
    ``fsdp_blocks`` (VideoCrafter2's UNet blocks), found among the modules of every denoiser, so the
    frozen reference copy of a full fine-tune is sharded block by block with the policy. A network without such a
    list keeps the root wrap, said once.
    """
    strategy = trainer_kwargs.get("strategy")
    if strategy not in ("fsdp", "fsdp_cpu_offload"):
        return
    nets = [getattr(backend, attr) for attr in getattr(backend, "denoiser_attrs", ())]
    nets += list(getattr(backend, "ref_denoisers", {}).values())
    # A network without the list (VideoTuna's lvdm UNet) may have its blocks named by the backend (fsdp_blocks).
    names = {name for net in nets
             for name in getattr(net, "_no_split_modules", None) or getattr(backend, "fsdp_blocks", ())}
    blocks = {type(m) for net in nets for m in net.modules() if type(m).__name__ in names}
    if not blocks:
        print(f"lightning.trainer.strategy={strategy}: {type(backend).__name__}'s denoiser names no blocks to shard "
              f"by (_no_split_modules); FSDP wraps the whole model as one unit")
        return
    from lightning.pytorch.strategies import FSDPStrategy

    trainer_kwargs["strategy"] = FSDPStrategy(auto_wrap_policy=blocks, cpu_offload=strategy == "fsdp_cpu_offload")
    print(f"lightning.trainer.strategy={strategy}: FSDP shards each of {', '.join(sorted(c.__name__ for c in blocks))}")


def routed_ddp(backend: Any, trainer_kwargs: dict[str, Any]) -> None:
    """A backend that routes each sample to one of several trained denoisers (Wan2.2-A14B's experts) leaves one
    unused on a rank whose batch fell in the other's range: DDP must then look for unused parameters, and a
    sharded strategy, whose ranks must all gather the same weights in step, cannot train both."""
    trained = tuple(getattr(backend, "trained_attrs", ()))
    if len(trained) < 2:
        return
    strategy, devices = trainer_kwargs.get("strategy", "auto"), trainer_kwargs.get("devices", 1)
    if isinstance(strategy, str) and strategy.startswith(("fsdp", "deepspeed")):
        raise UserError(f"lightning.trainer.strategy={strategy}: {type(backend).__name__} routes each sample to one of "
                        f"{', '.join(trained)} by its noise level, so ranks would run different experts, and a sharded "
                        f"strategy needs every rank to gather the same weights in step. Train one expert per run "
                        f"(model.train_experts=high, then low, each drawing only its own noise levels) or use ddp")
    several = (isinstance(devices, int) and devices > 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1) \
        or int(trainer_kwargs.get("num_nodes", 1)) > 1
    if strategy == "ddp" or (strategy == "auto" and several):
        trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
        print(f"lightning.trainer.strategy: ddp_find_unused_parameters_true (not {strategy}): "
              f"{type(backend).__name__} trains {', '.join(trained)}, and a batch may use only one")


def check_precompute_reference(model_cfg: Any, data_cfg: Any, source: str) -> None:
    """``dpo.precompute_reference`` needs a latent cache to store next to, and a reference it can compute."""
    if not data_cfg.get("cache"):
        raise UserError(f"{source}: dpo.precompute_reference stores the reference's draws next to the latent cache; "
                        f"set data.cache (build it with `videotuna cache`)")
    if model_cfg.get("finetune") == "full" and model_cfg.get("trainable_weights"):
        raise UserError(f"{source}: dpo.precompute_reference with model.finetune=full runs the reference as the policy "
                        f"before its first step, but model.trainable_weights makes that policy another model; start "
                        f"from those weights with model.init_weights (they then are the reference) or drop "
                        f"dpo.precompute_reference")


def reference_store(datamodule: Any, model_cfg: Any, top: Any) -> Any:
    """The stored reference draws of the run's latent cache, at the run's settings."""
    from videotuna_dpo.data.reference_draws import ReferenceDraws, reference_dir, reference_settings

    if not hasattr(getattr(datamodule, "dataset", None), "attach_draws"):
        raise UserError(f"dpo.precompute_reference needs the preference datamodule's latent cache (data.cache); "
                        f"{type(datamodule).__name__} has none")
    return ReferenceDraws(reference_dir(datamodule.cfg.cache), reference_settings(model_cfg, top.dpo, top.seed))


def precompute_reference(trainer: L.Trainer, module: DPOModule, datamodule: Any, store: Any, seed: int,
                         pairs_per_shard: int = 64) -> None:
    """Run the reference pre-pass over the pairs whose draws are not stored yet (each rank its share, through
    ``trainer.predict``), then give the dataset every pair's draws for training."""
    from videotuna_dpo.data.reference_draws import ReferencePass, ReferencePassData, draw_seed, pair_key

    dataset = datamodule.dataset
    keys = [pair_key(p) for p in dataset.pairs]
    pending = store.prepare(keys)
    if pending:
        print(f"dpo.precompute_reference: the reference's errors on {store.draws} draws of {len(pending)} of "
              f"{len(keys)} pairs -> {store.directory}")
        dataset.attach_draws({"seed": torch.tensor([[draw_seed(seed, key, k) for k in range(store.draws)]
                                                    for key in keys], dtype=torch.int64)})
        writer = ReferencePass(store, keys, pairs_per_shard)
        trainer.callbacks.append(writer)
        try:
            trainer.predict(module, datamodule=ReferencePassData(dataset, pending, store.draws, datamodule.cfg.batch_size),
                            return_predictions=False)
        finally:
            trainer.callbacks.remove(writer)
    dataset.attach_draws(store.load(keys))


def resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    """The checkpoint ``--resume`` names (``last``: ``out/checkpoints/last.ckpt``), checked to load as tensors only."""
    if not resume:
        return None
    path = out / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise UserError(f"--resume: checkpoint not found: {path}")
    fix = f"resume from another checkpoint (e.g. in {path.parent}) or start without --resume"
    try:  # mmap: the archive's structure is read, its tensors stay on disk
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # torch.load fails in many types (RuntimeError, UnpicklingError, EOFError, ...)
        raise UserError(f"--resume {path}: not a loadable checkpoint, e.g. truncated by a copy or save cut short "
                        f"({type(exc).__name__}: {first_line(exc)}); {fix}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"--resume {path}: not a Lightning checkpoint (no 'state_dict'); {fix}")
    return path


class DPOStrategy:
    """Strategy ``dpo``: Diffusion-DPO on a preference dataset with any registered backend."""

    schema = TrainSchema

    @classmethod
    def build(cls, cfg: Any, registry: Any, source: str = "<config>") -> tuple[Any, DPOModule, L.LightningDataModule]:
        """Validated config, the LightningModule and the DataModule of a run."""
        top = validate(cfg, TrainSchema, "", source)
        check_training_values(top.dpo, top.optimizer, "", source)
        check_trainer_kwargs(OmegaConf.to_container(top.lightning.trainer, resolve=True), source)
        check_values(top.lightning.checkpoint, "lightning.checkpoint",
                     {"every_n_train_steps": (lambda v: v >= 0, "an integer >= 0")}, source)
        model_cfg, data_cfg = cfg.get("model") or {}, cfg.get("data") or {}
        if "name" not in model_cfg:
            raise UserError(f"{source}: missing required key model.name (installed: {', '.join(registry.names('model'))})")
        precompute = top.dpo.precompute_reference
        if precompute:
            check_precompute_reference(model_cfg, data_cfg, source)
        data_name = data_cfg.get("name", "preference")
        datamodule = call_with_optional(registry.get("datamodule", data_name).from_config, data_cfg, source=source)
        backend_class = registry.get("model", model_cfg["name"])
        if getattr(datamodule, "holds_latents", False):  # batches carry latents: no VAE, no text encoder
            if not hasattr(backend_class, "latent_distribution"):
                raise UserError(f"{source}: data.name={data_name} gives latents, but model {model_cfg['name']} has no "
                                f"latent_distribution (it cannot be cached); train it from the videos")
            model_cfg = OmegaConf.merge(model_cfg, {"load_text_and_vae": False})
            if hasattr(datamodule, "check_model"):
                datamodule.check_model(model_cfg)
        if precompute:  # draws computed at other settings are refused before the model loads
            schema = getattr(backend_class, "schema", None)
            settings_cfg = validate(model_cfg, schema, "model", source) if schema else model_cfg
            reference_store(datamodule, settings_cfg, top).check_settings()
        with without_reference_copy() if precompute else nullcontext():
            backend = call_with_optional(backend_class.from_config, model_cfg, source=source)
        if hasattr(datamodule, "seed"):
            datamodule.seed = top.seed
        return top, DPOModule(backend, top.dpo, top.optimizer, seed=top.seed), datamodule

    @classmethod
    def run(cls, cfg: Any, registry: Any, resume: str | None = None, source: str = "<config>") -> Path:
        checked = validate(cfg, TrainSchema, "", source)
        out = Path(checked.output_dir)
        check_writable_dir(out, f"output_dir={out}")  # before any model loads
        trainer_kwargs = check_trainer_kwargs(OmegaConf.to_container(checked.lightning.trainer, resolve=True), source)
        check_engine(trainer_kwargs, cfg.get("model") or {}, checked.dpo, source)
        ckpt_path = resume_checkpoint(resume, out)
        top, module, datamodule = cls.build(cfg, registry, source)
        L.seed_everything(top.seed, workers=True)
        out = Path(top.output_dir)
        ck = top.lightning.checkpoint
        callbacks = [
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=out / "checkpoints", filename="step-{step}", every_n_train_steps=ck.every_n_train_steps,
                save_top_k=ck.save_top_k, save_last=True, auto_insert_metric_name=False,
            )
        ]
        if ck.export_weights:
            callbacks.append(ExportTrainableWeights(out / "weights", ck.every_n_train_steps))
        evaluator = eval_callback(cfg, source, registry)
        if evaluator is not None:
            callbacks.append(evaluator)
        trainer_kwargs.setdefault("max_steps", 1000)
        routed_ddp(module.backend, trainer_kwargs)
        wrap_blocks(module.backend, trainer_kwargs)
        if hasattr(datamodule, "shard_by_rank"):
            # A plugin's datamodule that shards by rank itself (ours does so unasked: its sampler is a
            # DistributedSampler, which Lightning keeps).
            datamodule.shard_by_rank = True
            trainer_kwargs["use_distributed_sampler"] = False
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        trainer = L.Trainer(
            default_root_dir=str(out),
            logger=L.pytorch.loggers.CSVLogger(str(out), name="logs"),
            callbacks=callbacks,
            **trainer_kwargs,
        )
        out.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:  # every DDP process runs this; one writes
            write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg))
        if top.dpo.precompute_reference:
            # Before fit, so a resumed run too computes any missing draws with the weights it started from.
            store = reference_store(datamodule, getattr(module.backend, "cfg", cfg.model), top)  # defaults filled in
            precompute_reference(trainer, module, datamodule, store, top.seed)
        # weights_only: resuming never runs pickled code from the checkpoint.
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if trainer.is_global_zero:
            write_json_atomic(out / "run.json", {"global_step": trainer.global_step, "output_dir": str(out)})
        return out
