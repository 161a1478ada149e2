"""What every backend over a diffusers video pipeline shares: loading a local diffusers-layout directory,
the frozen parts, the fine-tuning set-up, per-prompt generators and sampling through the pipeline.

A family is one file: its schema, its classes, its latent layout and how its transformer is called
(CogVideoX, Wan, HunyuanVideo).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from videotuna_dpo.config import validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import named_load_errors, seed_list
from videotuna_dpo.models.finetune import (ATTENTION_PROJECTIONS, DenoiserFinetuning, LoraSchema, dtype_setting, eval_mode,
                                          lora_field)


@dataclass
class DiffusersModelSchema:
    """The ``model:`` keys every diffusers family shares; a family's schema adds its own after them."""

    name: str = "???"
    pretrained: str = "???"  # a local diffusers-layout directory (the family's subfolders)
    finetune: str = "lora"  # "lora" (reference = adapters disabled) or "full" (frozen copy)
    lora: LoraSchema = lora_field(128, ATTENTION_PROJECTIONS)
    reference_on_cpu: bool = False  # full fine-tune: keep the frozen copy on CPU, move it per step
    weight_dtype: str = "bf16"  # frozen weights (text encoders, LoRA base, reference copy): fp32|bf16|fp16
    gradient_checkpointing: bool = False
    vae_slicing: bool = True
    vae_tiling: bool = False
    trainable_weights: Optional[str] = None  # a run's weights/<step> folder to start from / sample with
    init_weights: Optional[str] = None  # an SFT weights folder (LoRA or full) merged into the base: the reference
    load_text_and_vae: bool = True  # false when training on a latent cache


class DiffusersVideoBackend(DenoiserFinetuning, nn.Module):
    """Base of the backends over diffusers video pipelines; the denoiser(s) are ``transformer`` (and ``transformer_2``).

    A subclass sets ``schema``, ``subfolders``, ``example`` (a model directory users have), loads its
    parts in ``__init__`` with :meth:`load_part`, and calls :meth:`finish_setup`.
    """

    schema: type = object
    subfolders: tuple[str, ...] = ()
    example: str = ""
    denoiser_attr = "transformer"

    @classmethod
    def from_config(cls, model_cfg: Any, source: str = "<config>") -> "DiffusersVideoBackend":
        return cls(validate(model_cfg, cls.schema, "model", source))

    def open_pretrained(self, cfg: Any) -> Path:
        """``model.pretrained`` checked to be this family's diffusers directory (a missing part named)."""
        self.cfg = cfg
        root = Path(cfg.pretrained)
        missing = [s for s in self.subfolders if not (root / s).is_dir()]
        if missing:
            raise UserError(
                f"model.pretrained={root}: not a diffusers {self.family} directory; missing subfolder(s) "
                f"{', '.join(missing)}. Expected {', '.join(self.subfolders)} (e.g. a local copy of {self.example})."
            )
        self.weight_dtype = dtype_setting("model.weight_dtype", cfg.weight_dtype)
        self.root = root
        return root

    def load_part(self, cls: Any, subfolder: str, **kwargs: Any) -> Any:
        """``cls.from_pretrained(root, subfolder)`` offline; safetensors, or a .bin only as plain tensors."""
        with named_load_errors(self.root / subfolder, f"model.pretrained={self.root}"):
            return cls.from_pretrained(self.root, subfolder=subfolder, local_files_only=True, **kwargs)

    @property
    def denoiser_dtype(self) -> torch.dtype:
        """LoRA keeps the frozen base in ``weight_dtype``; a full fine-tune trains fp32 master weights."""
        return self.weight_dtype if self.cfg.finetune == "lora" else torch.float32

    def freeze(self, *modules: nn.Module | None) -> None:
        for module in modules:
            if module is not None:
                module.requires_grad_(False).eval()

    def setup_vae(self, vae: nn.Module) -> None:
        if self.cfg.vae_slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
        if self.cfg.vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()

    def finish_setup(self) -> None:
        """LoRA adapters or the reference copy, gradient checkpointing, then ``model.trainable_weights``."""
        self.setup_finetuning(reference_dtype=self.weight_dtype)
        self.setup_gradient_checkpointing()
        if self.cfg.trainable_weights:
            self.load_trainable(self.cfg.trainable_weights)

    # -- latents: the VAE posterior in the transformer's layout and scale ---------------------------------
    def latent_affine(self, like: torch.Tensor) -> tuple[Any, Any]:
        """``(shift, scale)`` with ``latents = (vae_latents - shift) * scale`` (broadcast in the VAE's layout)."""
        return 0.0, self.vae.config.scaling_factor

    def to_model_layout(self, z: torch.Tensor) -> torch.Tensor:
        """The VAE's ``[B, C', F', H', W']`` -> the transformer's layout (the same unless a family permutes)."""
        return z

    def to_vae_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def check_clip(self, pixels: torch.Tensor) -> None:
        """Refuse, by the config key to change, a clip this family's VAE cannot encode whole."""

    def check_causal_frames(self, frames: int, step: int, example: str) -> None:
        """A causal video VAE encodes frame 0, then chunks of ``step``: other counts silently lose their last frames."""
        if (frames - 1) % step:
            raise UserError(f"{self.family} encodes {step}k+1 frames ({example}); got clips of {frames} frames: set "
                            f"data.video_length to {(frames - 1) // step * step + 1} or "
                            f"{((frames - 1) // step + 1) * step + 1}")

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, F, H, W]`` in [-1, 1] -> the posterior's (mean, std) as latents, float32, the transformer's layout."""
        self.require_vae("encode videos")
        self.check_clip(pixels)
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        shift, scale = self.latent_affine(dist.mean)
        mean, std = (dist.mean.float() - shift) * scale, dist.std.float() * scale
        return self.to_model_layout(mean).contiguous(), self.to_model_layout(std).contiguous()

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` in [-1, 1] -> a posterior sample (latents)."""
        mean, std = self.latent_distribution(pixels)
        return mean + std * torch.randn_like(mean)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels ``[B, C, F, H, W]`` in [-1, 1], undone as the family's pipeline does before decoding."""
        self.require_vae("decode latents")
        z = self.to_vae_layout(latents.float())
        shift, scale = self.latent_affine(z)
        return self.vae.decode((z / scale + shift).to(self.vae.dtype)).sample.float()

    def require_vae(self, what: str) -> None:
        if getattr(self, "vae", None) is None:
            raise UserError(
                f"cannot {what}: the VAE and text encoder were not loaded (model.load_text_and_vae=false, "
                f"as when training from a latent cache)"
            )

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def generators(self, seed: int | list[int], n: int) -> list[torch.Generator]:
        """One generator per prompt, so a video never depends on the batch it was sampled in."""
        return [torch.Generator(device=self.device).manual_seed(s) for s in seed_list(seed, n)]

    def sample_with(self, pipe: Callable[..., Any], **kwargs: Any) -> torch.Tensor:
        """Run ``pipe`` with the denoisers in eval mode -> float ``[B, F, C, H, W]`` in [0, 1]."""
        with eval_mode(*self._live_nets().values()):
            frames = pipe(output_type="pt", **kwargs).frames
        return frames.float().clamp(0, 1)
