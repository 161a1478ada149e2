"""DPO inside an unmodified VideoTuna checkout: a ``flow.target`` and a ``data.target`` for its YAML.

``python scripts/train_new.py --base configs/videotuna/vc2_dpo.yaml`` (or ``wan_dpo.yaml``: Wan2.1 through
VideoTuna's WanVideoModelFlow) instantiates ``DPOFlow`` (wrapping the VideoTuna flow named in its params), calls
``from_pretrained(train.ckpt, ...)``,
``init_trainer(train)`` (the host's own: data, logger, callbacks, Trainer) and ``trainer.fit``.
Both classes subclass ``pytorch_lightning`` classes, as the host's Trainer requires.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from videotuna_dpo.config import validate
from videotuna_dpo.data.datamodule import PreferenceDataModule
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.videotuna_host import build_flow
from videotuna_dpo.registry import Registry
from videotuna_dpo.strategy import (DPOModule, DPOSchema, ExportCadence, OptimizerSchema, check_training_values,
                                    keep_trainable_only, log_run_summary, log_step)

# The backends built on a VideoTuna flow, by flow.params.backend -> registered model name. Here `wan` is
# VideoTuna's WanVideoModelFlow (the registry's `wan` is the diffusers Wan backend).
BACKENDS = {"videocrafter2": "videocrafter2", "t2v_turbo": "t2v_turbo", "wan": "wan_videotuna",
            "wan_videotuna": "wan_videotuna"}


def _backend_class(name: str) -> Any:
    if name not in BACKENDS:
        raise UserError(f"flow.params.backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return Registry.load().get("model", BACKENDS[name])


class _ExportWeights(ExportCadence, pl.Callback):
    """``ExportCadence`` on the host's ``pytorch_lightning`` Trainer."""


def make_host_checkpoint_dirs(trainer: Any) -> None:
    """The ``<dirpath>/flow`` folder of each VideoTuna checkpoint callback that saves the whole flow, made now on
    every rank. The host's ``VideoTunaModelCheckpoint`` saves the flow on every rank and makes that folder when it
    finds it missing, so under DDP two ranks race to make it and one dies with FileExistsError (2 of 17 two-process
    runs of the real host on CPU). Made here, before the first save, it is already there for both."""
    for callback in getattr(trainer, "callbacks", None) or ():
        dirpath = getattr(callback, "dirpath", None)
        if getattr(callback, "save_flow", False) and dirpath and hasattr(callback, "_save_flow_checkpoint"):
            os.makedirs(os.path.join(dirpath, "flow"), exist_ok=True)


class DPOFlow(pl.LightningModule):
    """``flow.target``: Diffusion-DPO on the VideoTuna flow in ``flow_config`` through a backend."""

    def __init__(self, flow_config: dict, backend: str = "videocrafter2", model: Optional[dict] = None,
                 dpo: Optional[dict] = None, optimizer: Optional[dict] = None, export_every_n_steps: int = 0):
        super().__init__()
        self.backend_class = _backend_class(backend)
        section = OmegaConf.create(flow_config)
        if "target" not in section:
            raise UserError("flow.params.flow_config needs a `target:` (e.g. videotuna.flow.videocrafter.VideocrafterFlow)")
        # Validated now so a bad key fails at instantiation, not after the weights load.
        self.model_cfg = validate({"name": BACKENDS[backend], **(model or {})}, self.backend_class.schema,
                                  "flow.params.model")
        self.dpo_cfg = validate(dpo or {}, DPOSchema, "flow.params.dpo")
        self.optim_cfg = validate(optimizer or {}, OptimizerSchema, "flow.params.optimizer")
        check_training_values(self.dpo_cfg, self.optim_cfg, "flow.params")
        if self.dpo_cfg.precompute_reference:
            raise UserError("flow.params.dpo.precompute_reference: the reference pre-pass runs in `videotuna train` "
                            "(on a latent cache); inside VideoTuna the reference runs live: remove it")
        self.export_every = int(export_every_n_steps)
        section = self.backend_class.check_flow_section(section, "flow.params.flow_config")
        self.inner = build_flow(section, BACKENDS[backend], self.backend_class.checkpoint_keys)
        self.backend: torch.nn.Module | None = None
        self.logdir: str | None = None  # the host's ImageLogger samples only when set
        self.export_dir: Path | None = None
        self.__dict__["_dpo"] = None  # a DPOModule over the same backend, kept out of this module's children
        self.strict_loading = False  # frozen weights come from train.ckpt, not the Lightning checkpoint

    # -- what scripts/train_new.py calls ------------------------------------------------------------
    def from_pretrained(self, ckpt_path: Any = None, denoiser_ckpt_path: Any = None, lora_ckpt_path: Any = None,
                        ignore_missing_ckpts: bool = False) -> None:
        """Load the weights (``train.ckpt``; ``train.trained_ckpt`` overrides the denoiser) and build the backend."""
        if not ckpt_path:
            raise UserError(f"train.ckpt is required: {self.backend_class.train_ckpt_hint}")
        cfg = OmegaConf.merge(self.model_cfg, {"ckpt": str(ckpt_path)})
        if denoiser_ckpt_path:
            cfg.denoiser_ckpt = str(denoiser_ckpt_path)
        if lora_ckpt_path and "lora_ckpt" in cfg and not cfg.lora_ckpt:
            cfg.lora_ckpt = str(lora_ckpt_path)
        self.backend = self.backend_class(cfg, flow=self.inner)
        self.__dict__["_dpo"] = DPOModule(self.backend, self.dpo_cfg, self.optim_cfg)

    def init_trainer(self, train_config: DictConfig) -> None:
        """The host's own ``init_trainer`` (data, logger, callbacks, Trainer), then our trainable set again."""
        if self.backend is None:
            raise UserError("DPOFlow.init_trainer before from_pretrained: call flow.from_pretrained(train.ckpt) first")
        self.inner.init_trainer(train_config)
        self.backend.restore_trainable()  # the host just marked the whole denoiser (or its peft LoRA) trainable
        self.trainer = self.inner.trainer
        self.data = self.inner.data
        self.logdir = getattr(self.inner, "logdir", None) or train_config.get("workdir")  # the ImageLogger samples when set
        lr_config = getattr(self.inner, "lr_config", None) or {}
        if "learning_rate" in lr_config:
            self.optim_cfg.lr = float(lr_config["learning_rate"])  # train.lr_config, as every VideoTuna run
        ckptdir = train_config.get("ckptdir") or train_config.get("workdir")
        self.export_dir = Path(ckptdir) / "dpo_weights" if ckptdir else None

    @property
    def denoiser(self) -> torch.nn.Module:
        """The host flow's denoiser (VideoTuna's checkpoint callback saves ``selected_model: [denoiser]``)."""
        return self.inner.denoiser

    # -- Lightning ------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out, used = self._dpo.seeded_step(batch, batch_idx, module=self)
        log_step(self, out, used)
        return out.loss

    def configure_optimizers(self):
        return self._dpo.configure_optimizers()

    def on_train_start(self) -> None:
        make_host_checkpoint_dirs(self.trainer)
        log_run_summary(self.trainer, self.dpo_cfg, self.optim_cfg)

    def configure_callbacks(self) -> list[pl.Callback]:
        """Weights export (``<ckptdir>/dpo_weights/step-N`` and ``last``) on the host's Trainer."""
        if self.export_dir is None:
            return []
        return [_ExportWeights(self.export_dir, self.export_every)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep_trainable_only(self, checkpoint)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], split: str = "train", ddim_steps: int | None = None,
                   unconditional_guidance_scale: float | None = None, **kwargs: Any) -> dict[str, Any]:
        """For the host's ImageLogger: the batch's captions sampled by the policy, ``[B, C, F, H, W]`` in [-1, 1].

        A pixel batch (``winner`` ``[B, C, F, H, W]``) sets the size; a latent-cache batch has no pixels,
        so the model's own default size is sampled.
        """
        captions = list(batch["caption"])
        options = {k: v for k, v in (("steps", ddim_steps), ("guidance", unconditional_guidance_scale)) if v is not None}
        if "winner" in batch:
            _, _, frames, height, width = batch["winner"].shape
            options.update(num_frames=frames, height=height, width=width)
        videos = self.backend.generate(captions, **options)
        return {"samples": videos.permute(0, 2, 1, 3, 4) * 2 - 1, "condition": captions}


class PreferenceData(pl.LightningDataModule):
    """``data.target``: the official-layout preference pairs (``videotuna_dpo`` PreferenceDataModule) for VideoTuna."""

    def __init__(self, train_data: str, batch_size: int = 1, **options: Any):
        super().__init__()
        self.inner = PreferenceDataModule.from_config(
            OmegaConf.create({"train_data": train_data, "batch_size": batch_size, **options}), "train.data.params")
        self.batch_size = batch_size
        self.datasets: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        self.inner.setup(stage)
        self.datasets = {"train": self.inner.dataset}

    def train_dataloader(self):
        # The host attaches its Trainer to this module; the inner one needs it for the rank's share and the
        # mid-epoch resume offset.
        self.inner.trainer = self.trainer
        return self.inner.train_dataloader()
