"""Backend ``toy``: the toy world's tiny text-to-video model behind the same protocol as CogVideoX.

Pixel space: "latents" are the videos themselves, ``[B, 3, F, H, W]`` in [-1, 1]; conditioning is
the word-level text encoder's features ``[B, L, D]`` (zeros for an empty caption). v-prediction
with diffusers' DDIM scheduler; full fine-tune (frozen reference copy) by default, LoRA optional.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from videotuna_dpo.config import validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import seed_list
from videotuna_dpo.models.finetune import DenoiserFinetuning, LoraSchema, lora_field
from videotuna_dpo.toy.model import ToyTextEncoder, ToyVideoUNet, tokenize

BUILTIN = Path(__file__).with_name("base")  # the shipped base checkpoint (python -m videotuna_dpo.toy.train_base)
SUBFOLDERS = ("unet", "text_encoder", "scheduler")


@dataclass
class ToySchema:
    name: str = "toy"
    pretrained: str = "builtin"  # "builtin" = the checkpoint shipped in the package
    finetune: str = "full"
    lora: LoraSchema = lora_field(8, ["film", "spatial", "temporal"])
    reference_on_cpu: bool = False
    gradient_checkpointing: bool = False  # the UNet's blocks recompute their activations in the backward pass
    trainable_weights: Optional[str] = None
    init_weights: Optional[str] = None  # a weights folder (LoRA or full) merged into the base: the reference
    load_text_and_vae: bool = True  # accepted for the cache path; the toy model has no VAE


def resolve_pretrained(pretrained: str, builtin: Path = BUILTIN, train_flags: str = "") -> Path:
    """``builtin`` (the shipped checkpoint) or a directory in the toy layout; ``train_flags``: train_base's options."""
    root = builtin if pretrained == "builtin" else Path(pretrained)
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise UserError(f"model.pretrained={root}: not a toy checkpoint; missing {', '.join(missing)} "
                        f"(build one with `python -m videotuna_dpo.toy.train_base{train_flags} --out DIR`)")
    return root


def save_toy_checkpoint(root: Path, unet: ToyVideoUNet, text_encoder: ToyTextEncoder, scheduler: Any) -> Path:
    """Write the toy model in its loading layout; weights as fp16 safetensors to stay small."""
    root.mkdir(parents=True, exist_ok=True)
    unet.to(torch.float16).save_pretrained(root / "unet", safe_serialization=True)
    text_encoder.to(torch.float16).save_pretrained(root / "text_encoder", safe_serialization=True)
    unet.float()
    text_encoder.float()
    scheduler.save_pretrained(root / "scheduler")
    return root


def toy_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")


class ToyBackend(DenoiserFinetuning, nn.Module):
    """The toy world's model as a DPO backend."""

    family = "toy"
    denoiser_attr = "unet"
    schema: type = ToySchema
    builtin = BUILTIN
    train_flags = ""  # the train_base options that build this family's checkpoint

    def __init__(self, cfg: ToySchema | Any):
        super().__init__()
        self.cfg = cfg
        root = resolve_pretrained(cfg.pretrained, self.builtin, self.train_flags)
        self.root = root
        self.scheduler = self._load_scheduler(root)
        self.unet = ToyVideoUNet.from_pretrained(root, subfolder="unet", torch_dtype=torch.float32)
        self.text_encoder = ToyTextEncoder.from_pretrained(root, subfolder="text_encoder", torch_dtype=torch.float32)
        self.text_encoder.requires_grad_(False).eval()
        self.setup_finetuning(reference_dtype=torch.float32)
        self.setup_gradient_checkpointing()
        if cfg.trainable_weights:
            self.load_trainable(cfg.trainable_weights)

    @classmethod
    def from_config(cls, model_cfg: Any, source: str = "<config>") -> "ToyBackend":
        return cls(validate(model_cfg, cls.schema, "model", source))

    @staticmethod
    def scheduler_class() -> type:
        """The diffusers scheduler the checkpoint's ``scheduler/`` holds; ``generate`` samples with it."""
        from diffusers import DDIMScheduler

        return DDIMScheduler

    def _load_scheduler(self, root: Path) -> Any:
        """The checkpoint's scheduler; one of another class (a ``toy`` checkpoint given to ``toy_flow``) is refused."""
        cls = self.scheduler_class()
        config = cls.load_config(root, subfolder="scheduler")
        if config.get("_class_name") != cls.__name__:
            raise UserError(f"model.pretrained={root}: its scheduler is {config.get('_class_name')}, but model.name="
                            f"{self.family} samples with {cls.__name__}; set model.name to the backend it was trained "
                            f"for (toy: DDIMScheduler, toy_flow: FlowMatchEulerDiscreteScheduler)")
        return cls.from_config(config)

    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel space: the video itself with zero spread."""
        x = pixels.float()
        return x, torch.zeros_like(x)

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, F, H, W]`` in [-1, 1] -> the same tensor (no VAE)."""
        return pixels.float()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> ``[B, L, D]``; padding positions and empty captions are zeros."""
        ids = tokenize(list(prompts)).to(self.text_encoder.embed.weight.device)
        return self.text_encoder(ids)

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=device, dtype=torch.long)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.get_velocity(x0, noise, t)

    def _predict_with(self, net: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mask = cond.abs().sum(-1) > 0  # [B, L]: real tokens
        return net(noisy, t, cond, mask).float()

    @torch.no_grad()
    def generate(self, prompts: list[str], num_frames: int = 8, steps: int = 20, guidance: float = 3.0,
                 seed: int | list[int] = 0, height: int = 32, width: int = 32, negative_prompt: str | None = None) -> torch.Tensor:
        """The checkpoint's sampler (DDIM; Euler for toy_flow) with classifier-free guidance.

        Returns float ``[B, F, C, H, W]`` in [0, 1]; video i starts from the noise of ``seed[i]`` alone.
        """
        device = next(self.unet.parameters()).device
        seeds = seed_list(seed, len(prompts))
        x = torch.stack([torch.randn(3, num_frames, height, width, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(device)
        cond = self.encode_prompt(prompts)
        uncond = self.encode_prompt([negative_prompt or ""] * len(prompts))
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # a fresh one: schedulers keep a step index
        scheduler.set_timesteps(steps)
        was_training = self.unet.training
        self.unet.eval()
        try:
            for t in scheduler.timesteps:
                tt = t.expand(len(prompts)).to(device)  # DDIM: integer steps; flow matching: s * num_train_timesteps
                if guidance == 1.0:
                    v = self.predict(x, tt, cond)
                else:  # conditional and unconditional in one batch
                    v_cond, v_uncond = self.predict(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, uncond])).chunk(2)
                    v = v_uncond + guidance * (v_cond - v_uncond)
                x = scheduler.step(v, t, x).prev_sample
        finally:
            self.unet.train(was_training)
        return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).contiguous()  # [B, F, C, H, W]
