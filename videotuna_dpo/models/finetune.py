"""LoRA or full fine-tuning of a backend's denoiser, and the reference model each implies.

LoRA (peft, through diffusers' ``add_adapter``): the reference is the same network with its
adapters disabled, so no second copy of the weights exists. Full: the reference is a frozen copy,
optionally kept on the CPU (outside the module, so ``.to(device)`` never moves it) and moved in per
step. Trainable weights are saved as safetensors: ``pytorch_lora_weights.safetensors`` (diffusers'
LoRA format, keys prefixed with the denoiser's name) or the denoiser's ``save_pretrained`` folder.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import (PredictFn, atomic_directory, init_weights_id, named_load_errors, read_safetensors,
                                      read_trainable_meta)

LORA_FILE = "pytorch_lora_weights.safetensors"


def merge_lora(net: nn.Module, state: dict[str, torch.Tensor], lora: dict[str, Any], what: str) -> None:
    """Fold a LoRA (a peft state dict and its rank/alpha/targets) into ``net``'s own weights, in place.

    peft injects and loads it as adapter ``init`` and ``merge_and_unload`` folds it away, leaving ``net``
    adapter-free: a DPO adapter added next trains over it, and disabling that adapter gives ``net``.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0,
                        target_modules=list(lora["target_modules"]))
    model = get_peft_model(net, config, adapter_name="init")
    prefix = "base_model.model."
    state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name="init")
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    loaded = [k for k in state if "lora_" in k]
    if unexpected or not loaded:
        raise UserError(f"{what}: its LoRA does not fit this model (unexpected keys {unexpected[:3]}, "
                        f"{len(loaded)} LoRA tensors); give the weights of a run on the same base model")
    model.merge_and_unload()
    net.__dict__.pop("peft_config", None)  # peft leaves its config on the unwrapped module


class DenoiserFinetuning:
    """Mixin for an ``nn.Module`` backend whose trainable network is ``getattr(self, denoiser_attr)``.

    The backend defines ``family``, ``cfg`` (with ``finetune``, ``lora``, ``reference_on_cpu``,
    ``pretrained``) and ``_predict_with(net, noisy, t, cond)``.
    """

    denoiser_attr = "denoiser"
    family = "?"

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_attr)

    def setup_finetuning(self, reference_dtype: torch.dtype = torch.float32) -> None:
        """Freeze the denoiser, then add LoRA adapters or make the frozen reference copy."""
        cfg = self.cfg
        if cfg.finetune not in ("lora", "full"):
            raise UserError(f"model.finetune must be 'lora' or 'full', got {cfg.finetune!r}")
        net = self.denoiser
        net.requires_grad_(False)
        if getattr(cfg, "init_weights", None):
            self.merge_init_weights(cfg.init_weights)
        self._ref_cpu: list[nn.Module] = []
        self.ref_denoiser: nn.Module | None = None
        if cfg.finetune == "lora":
            from peft import LoraConfig

            net.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                       target_modules=list(cfg.lora.target_modules), init_lora_weights=True))
            for p in net.parameters():  # adapters train in fp32 over a possibly low-precision base
                if p.requires_grad:
                    p.data = p.data.float()
            return
        reference = copy.deepcopy(net).to(reference_dtype).requires_grad_(False).eval()
        if cfg.reference_on_cpu:
            self._ref_cpu.append(reference)
        else:
            self.ref_denoiser = reference
        net.requires_grad_(True)

    def merge_init_weights(self, directory: str | Path) -> None:
        """``model.init_weights``: a weights folder (LoRA or full, e.g. an SFT run's) made part of the base.

        It runs before the DPO adapter or the reference copy exists, so the reference is that model.
        """
        directory = Path(directory)
        meta = read_trainable_meta(directory, self.family)
        if meta.get("finetune") == "lora":
            prefix = f"{self.denoiser_attr}."
            state = {k.removeprefix(prefix): v for k, v in read_safetensors(directory, LORA_FILE).items()}
            merge_lora(self.denoiser, state, meta["lora"], f"model.init_weights={directory}")
            return
        self._load_full_denoiser(directory, "model.init_weights")

    def _load_full_denoiser(self, directory: Path, key: str) -> None:
        """The denoiser ``save_trainable`` wrote with ``save_pretrained``: safetensors only, as it is written."""
        with named_load_errors(directory / self.denoiser_attr, f"{key}={directory}", read_bin=False):
            loaded = type(self.denoiser).from_pretrained(directory, subfolder=self.denoiser_attr, local_files_only=True,
                                                         use_safetensors=True)
        self.denoiser.load_state_dict(loaded.state_dict(), strict=True)

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._predict_with(self.denoiser, noisy, t, cond)

    @contextmanager
    def reference(self) -> Iterator[PredictFn]:
        """Context yielding the frozen reference model's ``predict``."""
        if self.cfg.finetune == "lora":
            self.denoiser.disable_adapters()
            try:
                yield self.predict
            finally:
                self.denoiser.enable_adapters()
            return
        if self.ref_denoiser is not None:
            yield partial(self._predict_with, self.ref_denoiser)
            return
        reference = self._ref_cpu[0]
        reference.to(next(self.denoiser.parameters()).device)
        try:
            yield partial(self._predict_with, reference)
        finally:
            reference.to("cpu")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def _write_lora(self, directory: Path, layers: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({f"{self.denoiser_attr}.{k}": v for k, v in layers.items()}, str(directory / LORA_FILE))

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the LoRA adapter or the full denoiser (safetensors) atomically to ``directory``."""
        meta = {"family": self.family, "finetune": self.cfg.finetune, "base": str(self.cfg.pretrained),
                "init_weights": init_weights_id(self.cfg)}
        if self.cfg.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            meta["lora"] = {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                            "target_modules": list(self.cfg.lora.target_modules)}
            layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.denoiser).items()}
            return atomic_directory(directory, lambda tmp: self._write_lora(tmp, layers), meta)
        return atomic_directory(
            directory, lambda tmp: self.denoiser.save_pretrained(tmp / self.denoiser_attr, safe_serialization=True), meta
        )

    def load_trainable(self, directory: str | Path) -> None:
        """Load what ``save_trainable`` wrote; a LoRA/full or rank mismatch is an error saying which."""
        directory = Path(directory)
        read_trainable_meta(directory, self.family, self.cfg)
        if self.cfg.finetune == "lora":
            from peft.utils import set_peft_model_state_dict

            prefix = f"{self.denoiser_attr}."
            state = {k.removeprefix(prefix): v for k, v in read_safetensors(directory, LORA_FILE).items()}
            result = set_peft_model_state_dict(self.denoiser, state, adapter_name="default")
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise UserError(f"{directory / LORA_FILE}: keys not in this model's LoRA: {unexpected[:5]}")
            return
        self._load_full_denoiser(directory, "model.trainable_weights")
