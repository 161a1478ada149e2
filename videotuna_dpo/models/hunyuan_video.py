"""HunyuanVideo through diffusers' own classes, trained with Flow-DPO.

Loaded from a local diffusers-layout directory (hunyuanvideo-community/HunyuanVideo). Latents
``[B, C', F', H', W']`` (the transformer's input), the VAE posterior times its ``scaling_factor`` as
``HunyuanVideoPipeline`` divides it out before decoding. The transformer is guidance-distilled: it takes
``guidance = embedded_guidance * 1000`` (``model.embedded_guidance``, 6.0 as the pipeline's default), in
training as the pipeline passes it when sampling.

Prompt conditioning is two encoders' outputs: Llama hidden states ``[L, D]`` after the prompt template
(with their attention mask ``[L]``) and CLIP's pooled output ``[D2]``. The latent cache, caption dropout
and the strategy's winner/loser ``torch.cat`` need one tensor per caption, so they travel packed
(:func:`pack_conditioning`) as ``[L + 1, max(D, D2) + 1]`` and are unpacked in ``predict``.
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
from videotuna_dpo.models.finetune import ATTENTION_PROJECTIONS, LoraSchema, dtype_setting, lora_field
from videotuna_dpo.models.flow_matching import FlowMatchingSchedule, FlowMatchingTraining

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@dataclass
class HunyuanVideoSchema(DiffusersModelSchema):
    name: str = "hunyuanvideo"
    lora: LoraSchema = lora_field(32, ATTENTION_PROJECTIONS)
    vae_dtype: str = "fp16"  # HunyuanVideo's VAE precision (its reference code runs the VAE in fp16)
    vae_tiling: bool = True  # 720p x 129 frames does not decode in one piece
    max_sequence_length: int = 256  # Llama tokens after the template, as HunyuanVideoPipeline
    prompt_template: Optional[str] = None  # "...{}..." around the caption; default: the pipeline's template
    crop_start: Optional[int] = None  # template tokens before the caption; default: counted with the tokenizer (95)
    embedded_guidance: float = 6.0  # the distilled guidance the transformer is given in training (x 1000)
    true_cfg_scale: float = 1.0  # sampling: > 1 runs a second, negative-prompt pass (generate.negative_prompt)
    flow_shift: Optional[float] = None  # training shift; default: the scheduler's shift (7.0)


def pack_conditioning(embeds: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Llama embeds ``[B, L, D]``, mask ``[B, L]``, CLIP pooled ``[B, D2]`` -> one float ``[B, L + 1, W]``.

    ``W = max(D, D2) + 1``. Row ``i < L``: ``embeds[i]`` in columns ``[0, D)``, ``mask[i]`` in column ``W - 1``;
    row ``L``: ``pooled`` in ``[0, D2)``, 1 in column ``W - 1``; zeros elsewhere.
    """
    b, length, d = embeds.shape
    d2 = pooled.shape[-1]
    packed = torch.zeros(b, length + 1, max(d, d2) + 1, dtype=torch.float32, device=embeds.device)
    packed[:, :length, :d] = embeds.float()
    packed[:, :length, -1] = mask.float()
    packed[:, length, :d2] = pooled.float()
    packed[:, length, -1] = 1.0
    return packed


def unpack_conditioning(cond: torch.Tensor, text_dim: int, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, L + 1, W]`` from :func:`pack_conditioning` -> (embeds ``[B, L, D]``, mask ``[B, L]``, pooled ``[B, D2]``)."""
    width = max(text_dim, pooled_dim) + 1
    if cond.dim() != 3 or cond.shape[-1] != width:
        raise UserError(f"HunyuanVideo conditioning of shape {list(cond.shape)}, but this transformer takes "
                        f"[B, L + 1, {width}] (text_embed_dim {text_dim}, pooled_projection_dim {pooled_dim}): "
                        f"encode the captions (or build the latent cache) with this model")
    return cond[:, :-1, :text_dim], cond[:, :-1, -1], cond[:, -1, :pooled_dim]


class HunyuanVideoBackend(FlowMatchingTraining, DiffusersVideoBackend):
    """HunyuanVideo (13B, guidance-distilled) as a Flow-DPO backend; LoRA by default."""

    family = "hunyuanvideo"
    schema = HunyuanVideoSchema
    subfolders = SUBFOLDERS
    example = "hunyuanvideo-community/HunyuanVideo at checkpoints/hunyuan/HunyuanVideo"

    def __init__(self, cfg: HunyuanVideoSchema | Any):
        super().__init__()
        from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

        self.open_pretrained(cfg)
        vae_dtype = dtype_setting("model.vae_dtype", cfg.vae_dtype)
        self.scheduler = self.load_part(FlowMatchEulerDiscreteScheduler, "scheduler")
        self.transformer = self.load_part(HunyuanVideoTransformer3DModel, "transformer", torch_dtype=self.denoiser_dtype)
        self.vae = self.tokenizer = self.text_encoder = self.tokenizer_2 = self.text_encoder_2 = None
        if cfg.load_text_and_vae:
            self.vae = self.load_part(AutoencoderKLHunyuanVideo, "vae", torch_dtype=vae_dtype)
            self.text_encoder = self.load_part(LlamaModel, "text_encoder", dtype=self.weight_dtype)
            self.tokenizer = self.load_part(AutoTokenizer, "tokenizer")
            # The transformer reads its text mask as a prefix of valid tokens (it counts them): pad on the right.
            self.tokenizer.padding_side = "right"
            self.text_encoder_2 = self.load_part(CLIPTextModel, "text_encoder_2", dtype=self.weight_dtype)
            self.tokenizer_2 = self.load_part(CLIPTokenizer, "tokenizer_2")
            self.freeze(self.vae, self.text_encoder, self.text_encoder_2)
            self.setup_vae(self.vae)
        self.flow_schedule = self._schedule(cfg)
        self.finish_setup()

    def _schedule(self, cfg: Any) -> FlowMatchingSchedule:
        config = self.scheduler.config
        if config.get("use_dynamic_shifting", False) and cfg.flow_shift is None:
            raise UserError(f"{self.root / 'scheduler'}: use_dynamic_shifting makes the shift depend on the resolution; "
                            f"set model.flow_shift (HunyuanVideo ships a fixed shift of 7.0)")
        schedule = FlowMatchingSchedule.from_scheduler_config(config)
        return replace(schedule, shift=float(cfg.flow_shift)) if cfg.flow_shift is not None else schedule

    # -- prompts ------------------------------------------------------------------------------------
    @cached_property
    def prompt_template(self) -> dict[str, Any]:
        """The pipeline's ``prompt_template``: the template and ``crop_start``, the tokens before the caption.

        ``crop_start`` unset is counted with this tokenizer: the tokens (BOS included) of the template up to
        ``{}``, which is where the caption's first token lands (95 for HunyuanVideo's Llama 3 tokenizer).
        """
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

        template = self.cfg.prompt_template or DEFAULT_PROMPT_TEMPLATE["template"]
        if template.count("{}") != 1:
            raise UserError(f"model.prompt_template must hold one '{{}}' where the caption goes; got {template!r}")
        crop_start = self.cfg.crop_start
        if crop_start is None:
            self.require_vae("count the prompt template's tokens")
            crop_start = len(self.tokenizer(template.split("{}")[0])["input_ids"])
        return {"template": template, "crop_start": int(crop_start)}

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> packed conditioning ``[B, L + 1, max(D, D2) + 1]`` (:func:`pack_conditioning`), L = max_sequence_length."""
        self.require_vae("encode prompts")
        embeds, pooled, mask = self._pipe.encode_prompt(
            list(prompts), prompt_template=self.prompt_template, device=self.text_encoder.device,
            dtype=torch.float32, max_sequence_length=self.cfg.max_sequence_length)
        return pack_conditioning(embeds, mask, pooled)  # [B, L, D], [B, L], [B, D2] -> [B, L + 1, W]

    # -- latents ------------------------------------------------------------------------------------
    # Latents ``[B, C', F', H', W']``: the posterior times the VAE's scaling_factor (the base's default).
    def check_clip(self, pixels: torch.Tensor) -> None:
        _, _, frames, height, width = pixels.shape
        self.check_causal_frames(frames, self.vae.temporal_compression_ratio, "1, 5, ..., 129")
        multiple = self.vae.spatial_compression_ratio * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise UserError(f"HunyuanVideo takes heights and widths that are multiples of {multiple}; got {height}x{width}: "
                            f"set data.resolution to multiples of {multiple} (e.g. 544x960, 720x1280)")

    # -- the denoiser -------------------------------------------------------------------------------
    def guidance_input(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The pipeline's ``guidance``: ``embedded_guidance`` in the transformer's dtype, times 1000 (``[n]``)."""
        return torch.tensor([self.cfg.embedded_guidance] * n, dtype=dtype, device=device) * 1000.0

    def _predict_with(self, transformer: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """noisy ``[B, C', F', H', W']``, t ``[B]``, packed cond ``[B, L + 1, W]`` -> velocity ``[B, C', F', H', W']``.

        ``t`` goes in float32, as the pipeline's first step passes it (its later steps pass it in the latents'
        dtype, bf16 once the scheduler returns bf16 latents); training keeps the exact ``t`` the noise was mixed at.
        """
        dtype = transformer.dtype  # as the pipeline: inputs and guidance in the transformer's dtype
        config = transformer.config
        embeds, mask, pooled = unpack_conditioning(cond, config.text_embed_dim, config.pooled_projection_dim)
        out = transformer(hidden_states=noisy.to(dtype), timestep=t.float(), encoder_hidden_states=embeds.to(dtype),
                          encoder_attention_mask=mask.to(dtype), pooled_projections=pooled.to(dtype),
                          guidance=self.guidance_input(noisy.shape[0], dtype, noisy.device), return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def generate(self, prompts: list[str], num_frames: int = 129, steps: int = 50, guidance: float = 6.0,
                 seed: int | list[int] = 0, height: int = 720, width: int = 1280, negative_prompt: str | None = None,
                 true_cfg_scale: float | None = None) -> torch.Tensor:
        """Sample with diffusers' ``HunyuanVideoPipeline`` -> float ``[B, F, C, H, W]`` in [0, 1], one generator per prompt.

        ``guidance`` is the embedded (distilled) guidance scale; ``true_cfg_scale`` (default
        ``model.true_cfg_scale``) > 1 adds a negative-prompt pass.
        """
        self.require_vae("generate")
        true_cfg = self.cfg.true_cfg_scale if true_cfg_scale is None else true_cfg_scale
        if negative_prompt and true_cfg <= 1:
            raise UserError("HunyuanVideo is guidance-distilled: a negative prompt is used only with true "
                            f"classifier-free guidance; set model.true_cfg_scale > 1 (it is {true_cfg}) or remove "
                            "generate.negative_prompt")
        return self.sample_with(
            self._pipe,
            prompt=list(prompts),
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            true_cfg_scale=true_cfg, num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
            height=height, width=width, generator=self.generators(seed, len(prompts)),
            prompt_template=self.prompt_template, max_sequence_length=self.cfg.max_sequence_length,
        )

    @cached_property
    def _pipe(self):
        from diffusers import HunyuanVideoPipeline

        # Built once over our modules; its own scheduler copy keeps set_timesteps away from training.
        return HunyuanVideoPipeline(text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=self.transformer,
                                    vae=self.vae, scheduler=copy.deepcopy(self.scheduler),
                                    text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
