"""Wan2.1 / Wan2.2 through diffusers' own classes, trained with Flow-DPO.

Loaded from a local diffusers-layout directory (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, -14B, Wan2.2-TI2V-5B,
Wan2.2-T2V-A14B). Latents ``[B, C', F', H', W']`` (the transformer's input), normalised with the VAE's
``latents_mean`` / ``latents_std`` as ``WanPipeline`` does; prompt conditioning ``[B, L, D]`` from UMT5.
Wan2.2-A14B has two experts: ``transformer`` for noise levels at or above the pipeline's
``boundary_ratio`` (high noise), ``transformer_2`` below it; each sample is routed as the pipeline routes
it, and ``model.train_experts`` chooses which of them train.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, Optional

import torch
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.diffusers_video import DiffusersModelSchema, DiffusersVideoBackend
from videotuna_dpo.models.finetune import ATTENTION_PROJECTIONS, LoraSchema, lora_field
from videotuna_dpo.models.flow_matching import FlowMatchingSchedule, FlowMatchingTraining
from videotuna_dpo.user_files import read_json

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
EXPERTS = ("both", "high", "low")


@dataclass
class WanSchema(DiffusersModelSchema):
    name: str = "wan"
    lora: LoraSchema = lora_field(32, ATTENTION_PROJECTIONS)
    vae_tiling: bool = False
    max_sequence_length: int = 512  # UMT5 tokens, as WanPipeline
    flow_shift: Optional[float] = None  # training shift; default: the scheduler's flow_shift (3.0 at 480p, 5.0 at 720p)
    train_experts: str = "both"  # Wan2.2-A14B: both | high (transformer) | low (transformer_2)


class WanBackend(FlowMatchingTraining, DiffusersVideoBackend):
    """Wan2.1 (1.3B, 14B) and Wan2.2 (TI2V-5B, two-expert A14B) as Flow-DPO backends; LoRA by default."""

    family = "wan"
    schema = WanSchema
    subfolders = SUBFOLDERS
    trained_setting = "model.train_experts (both: transformer, transformer_2; high: transformer; low: transformer_2)"
    example = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers at checkpoints/wan/Wan2.1-T2V-1.3B-Diffusers"

    def __init__(self, cfg: WanSchema | Any):
        super().__init__()
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = self.open_pretrained(cfg)
        pipeline_config = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
        self.boundary_ratio: float | None = pipeline_config.get("boundary_ratio")
        self.expand_timesteps = bool(pipeline_config.get("expand_timesteps", False))  # Wan2.2-TI2V-5B
        self.two_experts = (root / "transformer_2").is_dir()
        if self.two_experts and self.boundary_ratio is None:
            raise UserError(f"model.pretrained={root}: has transformer_2/ but model_index.json sets no boundary_ratio; "
                            f"a Wan2.2-A14B directory sets it (0.875 for T2V)")
        if cfg.train_experts not in EXPERTS:
            raise UserError(f"model.train_experts must be one of {', '.join(EXPERTS)}, got {cfg.train_experts!r}")
        if cfg.train_experts != "both" and not self.two_experts:
            raise UserError(f"model.train_experts={cfg.train_experts!r} needs a two-expert model (Wan2.2-A14B, with "
                            f"transformer_2/); {root} has one transformer: remove model.train_experts")
        self.scheduler = self.load_part(_scheduler_class(root), "scheduler")
        experts = ("transformer", "transformer_2") if self.two_experts else ("transformer",)
        if cfg.train_experts != "both" and not cfg.load_text_and_vae:
            # Training one expert from a latent cache never calls the other (its range is never drawn): not loaded.
            experts = ("transformer",) if cfg.train_experts == "high" else ("transformer_2",)
        self.loaded_experts = experts
        self.denoiser_attr = experts[0]
        for attr in experts:
            setattr(self, attr, self.load_part(WanTransformer3DModel, attr, torch_dtype=self.denoiser_dtype))
        self.vae = self.tokenizer = self.text_encoder = None
        if cfg.load_text_and_vae:
            self.vae = self.load_part(AutoencoderKLWan, "vae", torch_dtype=torch.float32)  # as WanPipeline: fp32 VAE
            self.text_encoder = self.load_part(UMT5EncoderModel, "text_encoder", dtype=self.weight_dtype)
            self.tokenizer = self.load_part(AutoTokenizer, "tokenizer")
            self.freeze(self.vae, self.text_encoder)
            self.setup_vae(self.vae)
        schedule = FlowMatchingSchedule.from_scheduler_config(self.scheduler.config)
        if cfg.flow_shift is not None:
            schedule = replace(schedule, shift=float(cfg.flow_shift))
        self.flow_schedule = self._restricted(schedule)
        self.finish_setup()

    # -- experts ------------------------------------------------------------------------------------
    @property
    def denoiser_attrs(self) -> tuple[str, ...]:
        return self.loaded_experts

    @property
    def trained_attrs(self) -> tuple[str, ...]:
        return {"both": self.denoiser_attrs, "high": ("transformer",), "low": ("transformer_2",)}[self.cfg.train_experts]

    @property
    def boundary_timestep(self) -> float | None:
        """The pipeline's switch: ``t >= boundary_ratio * num_train_timesteps`` goes to ``transformer``."""
        if not self.two_experts:
            return None
        return self.boundary_ratio * self.flow_schedule.num_train_timesteps

    def _restricted(self, schedule: FlowMatchingSchedule) -> FlowMatchingSchedule:
        """Training one expert of two: noise levels are drawn only in the range that expert denoises."""
        expert = self.cfg.train_experts
        if not self.two_experts or expert == "both":
            return schedule
        low, high = (self.boundary_ratio, 1.0) if expert == "high" else (0.0, self.boundary_ratio)
        return replace(schedule, low=low, high=high)

    # -- the protocol -------------------------------------------------------------------------------
    # Latents ``[B, C', F', H', W']``: the posterior normalised with the VAE's latents_mean / latents_std.
    def latent_affine(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32, device=like.device).view(shape)
        std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32, device=like.device).view(shape)
        return mean, 1 / std

    def check_clip(self, pixels: torch.Tensor) -> None:
        self.check_causal_frames(pixels.shape[2], self.vae.config.scale_factor_temporal, "1, 5, ..., 81")

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> UMT5 embeddings ``[B, L, D]``, zero past each caption's tokens (as WanPipeline)."""
        self.require_vae("encode prompts")
        embeds, _ = self._pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                             max_sequence_length=self.cfg.max_sequence_length,
                                             device=self.text_encoder.device, dtype=self.text_encoder.dtype)
        return embeds.float()

    def _predict_nets(self, nets: dict[str, nn.Module], noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Each sample through the expert the pipeline would use at its ``t``."""
        boundary = self.boundary_timestep
        if boundary is None:
            return self._predict_with(nets["transformer"], noisy, t, cond)
        high = t >= boundary
        out = torch.zeros(noisy.shape, dtype=torch.float32, device=noisy.device)
        for mask, attr in ((high, "transformer"), (~high, "transformer_2")):
            if mask.any():
                if attr not in nets:
                    raise UserError(f"a sample at t={float(t[mask][0]):.1f} needs {attr}, which was not loaded "
                                    f"(model.train_experts={self.cfg.train_experts!r} from a latent cache)")
                out = out.index_put((mask,), self._predict_with(nets[attr], noisy[mask], t[mask], cond[mask]))
        return out

    def _predict_with(self, transformer: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        dtype = next(transformer.parameters()).dtype
        timestep = t.float()
        if self.expand_timesteps:  # Wan2.2-TI2V: one timestep per latent patch, as the pipeline passes them
            p_t, p_h, p_w = transformer.config.patch_size
            _, _, f, h, w = noisy.shape
            timestep = timestep[:, None].expand(-1, (f // p_t) * (h // p_h) * (w // p_w))
        out = transformer(hidden_states=noisy.to(dtype), timestep=timestep, encoder_hidden_states=cond.to(dtype),
                          return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def generate(self, prompts: list[str], num_frames: int = 81, steps: int = 50, guidance: float = 5.0,
                 seed: int | list[int] = 0, height: int = 480, width: int = 832, negative_prompt: str | None = None,
                 guidance_2: float | None = None) -> torch.Tensor:
        """Sample with diffusers' ``WanPipeline`` -> float ``[B, F, C, H, W]`` in [0, 1], one generator per prompt.

        ``guidance_2``: the low-noise expert's guidance (Wan2.2-A14B; default ``guidance``).
        """
        self.require_vae("generate")
        extra = {"guidance_scale_2": guidance_2 if guidance_2 is not None else guidance} if self.two_experts else {}
        return self.sample_with(
            self._pipe,
            prompt=list(prompts),
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
            generator=self.generators(seed, len(prompts)), max_sequence_length=self.cfg.max_sequence_length, **extra,
        )

    # -- helpers ------------------------------------------------------------------------------------
    @cached_property
    def _pipe(self):
        from diffusers import WanPipeline

        # Built once over our modules; its own scheduler copy keeps set_timesteps away from training.
        return WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                           scheduler=copy.deepcopy(self.scheduler), transformer=self.transformer,
                           transformer_2=getattr(self, "transformer_2", None), boundary_ratio=self.boundary_ratio,
                           expand_timesteps=self.expand_timesteps)


def _scheduler_class(root: Any) -> Any:
    """The scheduler class the directory names (Wan ships UniPC with flow sigmas; FlowMatchEuler also works)."""
    import diffusers

    path = root / "scheduler" / "scheduler_config.json"
    name = read_json(path).get("_class_name", "") if path.is_file() else ""
    cls = getattr(diffusers, name, None) if name else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise UserError(f"{path}: names no diffusers scheduler class ({name!r}); Wan ships UniPCMultistepScheduler")
    return cls
