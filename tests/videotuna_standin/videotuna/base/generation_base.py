"""Stand-in for videotuna.base.generation_base.GenerationBase: components, peft LoRA, init_trainer."""

import os

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn

from videotuna.utils.common_utils import instantiate_from_config


class GenerationBase(pl.LightningModule):
    def __init__(self, first_stage_config, cond_stage_config, denoiser_config, scheduler_config=None,
                 cond_stage_2_config=None, lora_config=None, trainable_components=()):
        super().__init__()
        self.components = []
        self.denoiser = self._frozen(instantiate_from_config(denoiser_config), "denoiser")
        self.first_stage_model = self._frozen(instantiate_from_config(first_stage_config), "first_stage_model")
        self.cond_stage_model = self._frozen(instantiate_from_config(cond_stage_config), "cond_stage_model")
        self.cond_stage_2_model = None
        self.use_lora = False
        if lora_config is not None:
            from peft import get_peft_model

            self.denoiser = get_peft_model(self.denoiser, instantiate_from_config(lora_config))
            self.lora_params = {n for n, p in self.denoiser.named_parameters() if p.requires_grad and "lora" in n}
            self.denoiser.requires_grad_(False)
            self.use_lora = True
        if scheduler_config is not None:  # as the host: no scheduler attribute at all without a config (Wan)
            self.scheduler = self.diffusion_scheduler = instantiate_from_config(scheduler_config)
            self.components.append("scheduler")
        self.set_trainable_components(trainable_components)

    def _frozen(self, model, name):
        self.components.append(name)
        return model.eval().requires_grad_(False)

    def set_trainable_components(self, components=()):
        components = [components] if isinstance(components, str) else components
        for name in self.components:
            model = getattr(self, name)
            if isinstance(model, nn.Module):
                model.eval().requires_grad_(False)
        for name in components:
            model = getattr(self, name)
            model.train()
            if name == "denoiser" and self.use_lora:
                for n, p in model.named_parameters():
                    p.requires_grad_(n in self.lora_params)
            else:
                model.requires_grad_(True)

    def load_denoiser(self, ckpt_path=None, denoiser_ckpt_path=None, ignore_missing_ckpts=False):
        """As the host: ``<ckpt_path>/denoiser.ckpt`` (or ``denoiser_ckpt_path``), a state dict, strict."""
        path = denoiser_ckpt_path if denoiser_ckpt_path is not None else os.path.join(ckpt_path, "denoiser.ckpt")
        if os.path.exists(path):
            state = torch.load(path, map_location="cpu")
            self.denoiser.load_state_dict(state.get("state_dict", state), strict=True)
        elif not ignore_missing_ckpts:
            raise FileNotFoundError("Checkpoint of denoiser file not found.")

    def init_trainer(self, train_config):
        lightning_config = train_config.get("lightning")
        trainer_config = OmegaConf.to_container(lightning_config.get("trainer"), resolve=True)
        self.first_stage_key = train_config.first_stage_key
        self.cond_stage_key = train_config.cond_stage_key
        self.logdir = train_config["workdir"]
        lr_config = OmegaConf.to_container(train_config.get("lr_config"), resolve=True)
        lr_config["learning_rate"] = lr_config["base_learning_rate"]
        self.lr_config = lr_config
        self.data = instantiate_from_config(train_config["data"])
        self.data.setup()
        assert all(len(d) > 0 for d in self.data.datasets.values())
        trainer_config.pop("num_nodes", None)
        # As the host: every lightning.callbacks entry instantiated, the image logger saving under workdir.
        callbacks_cfg = OmegaConf.to_container(lightning_config.get("callbacks") or OmegaConf.create(), resolve=True)
        if "image_logger" in callbacks_cfg:
            callbacks_cfg["image_logger"].setdefault("params", {})["save_dir"] = train_config["workdir"]
        callbacks = [instantiate_from_config(OmegaConf.create(c)) for c in callbacks_cfg.values()]
        # As the host's get_trainer_strategy: DDP unless lightning.strategy says otherwise, even on one device,
        # so a trainable parameter that gets no gradient stops the run here as it does there.
        strategy = lightning_config.get("strategy") or pl.strategies.DDPStrategy()
        self.trainer = pl.Trainer(**trainer_config, logger=False, callbacks=callbacks, num_sanity_val_steps=0,
                                  strategy=strategy, default_root_dir=train_config["workdir"])
        self.set_trainable_components(["denoiser"])
