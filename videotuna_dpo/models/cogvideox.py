"""CogVideoX through diffusers' own classes, loaded from a local diffusers-layout directory.

Latent layout: ``[B, F', C', H', W']`` (diffusers' CogVideoX transformer input), prompt
conditioning ``[B, L, D]`` from the T5 encoder. The prediction type (v for CogVideoX) comes from
the checkpoint's scheduler config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.diffusers_video import DiffusersModelSchema, DiffusersVideoBackend

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class CogVideoXSchema(DiffusersModelSchema):
    name: str = "cogvideox"
    vae_tiling: bool = False
    max_sequence_length: Optional[int] = None  # default: transformer.config.max_text_seq_length


class CogVideoXBackend(DiffusersVideoBackend):
    """CogVideoX (2B, 5B) as a DPO backend: v-prediction, LoRA by default, full fine-tune optional."""

    family = "cogvideox"
    schema = CogVideoXSchema
    subfolders = SUBFOLDERS
    example = "THUDM/CogVideoX-2b at checkpoints/cogvideo/CogVideoX-2b"

    def __init__(self, cfg: CogVideoXSchema | Any):
        super().__init__()
        from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
        from transformers import AutoTokenizer, T5EncoderModel

        root = self.open_pretrained(cfg)
        self.scheduler = self.load_part(CogVideoXDDIMScheduler, "scheduler")
        self.transformer = self.load_part(CogVideoXTransformer3DModel, "transformer", torch_dtype=self.denoiser_dtype)
        self.vae = self.tokenizer = self.text_encoder = None
        if cfg.load_text_and_vae:
            self.vae = self.load_part(AutoencoderKLCogVideoX, "vae", torch_dtype=self.weight_dtype)
            self.text_encoder = self.load_part(T5EncoderModel, "text_encoder", dtype=self.weight_dtype)
            self.tokenizer = self.load_part(AutoTokenizer, "tokenizer")
            self.freeze(self.vae, self.text_encoder)
            self.setup_vae(self.vae)
        self.max_sequence_length = cfg.max_sequence_length or self.transformer.config.max_text_seq_length
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("v_prediction", "epsilon"):
            raise UserError(f"{root}/scheduler: unsupported prediction_type {self.prediction_type!r}")
        self.finish_setup()

    @property
    def vae_scale_factor_spatial(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    # -- the protocol -----------------------------------------------------------------------------
    # Latents ``[B, F', C', H', W']``: the VAE's ``[B, C', F', H', W']`` times scaling_factor, frames first.
    def to_model_layout(self, z: torch.Tensor) -> torch.Tensor:
        return z.permute(0, 2, 1, 3, 4)

    def to_vae_layout(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> T5 embeddings ``[B, L, D]``."""
        self.require_vae("encode prompts")
        embeds, _ = self._pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.text_encoder.device,
            dtype=self.text_encoder.dtype,
        )
        return embeds.float()

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Uniform integer timesteps in [0, num_train_timesteps), as CogVideoX was trained."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=device, dtype=torch.long)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return noise

    def _write_lora(self, directory: Path, layers: dict[str, dict[str, torch.Tensor]]) -> None:
        from diffusers import CogVideoXPipeline

        # diffusers' own LoRA format: `CogVideoXPipeline.load_lora_weights(directory)` reads it.
        CogVideoXPipeline.save_lora_weights(directory, transformer_lora_layers=layers["transformer"],
                                            safe_serialization=True)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        num_frames: int = 49,
        steps: int = 50,
        guidance: float = 6.0,
        seed: int | list[int] = 0,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
    ) -> torch.Tensor:
        """Sample with diffusers' CogVideoX pipeline -> float ``[B, F, C, H, W]`` in [0, 1].

        ``seed`` as a list gives each prompt its own generator, so a video never depends on its batch.
        """
        self.require_vae("generate")
        height = height or self.transformer.config.sample_height * self.vae_scale_factor_spatial
        width = width or self.transformer.config.sample_width * self.vae_scale_factor_spatial
        return self.sample_with(
            self._pipe,
            prompt=list(prompts),
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            num_frames=num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=self.generators(seed, len(prompts)),
            height=height,
            width=width,
            max_sequence_length=self.max_sequence_length,
        )

    # -- helpers ----------------------------------------------------------------------------------
    def _predict_with(self, transformer: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rope = None
        if transformer.config.use_rotary_positional_embeddings:
            _, frames, _, h, w = noisy.shape
            rope = self._pipe._prepare_rotary_positional_embeddings(
                height=h * self.vae_scale_factor_spatial,
                width=w * self.vae_scale_factor_spatial,
                num_frames=frames,
                device=noisy.device,
            )
        dtype = next(transformer.parameters()).dtype
        out = transformer(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=cond.to(dtype),
            timestep=t,
            image_rotary_emb=rope,
            return_dict=False,
        )[0]
        return out.float()

    @cached_property
    def _pipe(self):
        from diffusers import CogVideoXPipeline

        # Built once: it holds our module objects, which .to(device) moves in place; its own
        # scheduler copy keeps generate's set_timesteps away from the training scheduler.
        return CogVideoXPipeline(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            transformer=self.transformer,
            scheduler=copy.deepcopy(self.scheduler),
        )
