"""VideoCrafter2 through VideoTuna's own ``VideocrafterFlow`` (its model zoo, not a copy of it).

Latent layout: ``[B, 4, F, H/8, W/8]`` (VideoTuna's 2D VAE applied frame by frame, times
``scale_factor``); prompt conditioning ``[B, 77, 1024]`` from the flow's ``cond_stage_model``.
eps-prediction; VC2's timestep-dependent input scaling (``use_scale``/``scale_arr``) is applied to
x0 before noising exactly as the host's ``VideocrafterFlow.forward`` does.

Fine-tuning is :class:`~videotuna_dpo.models.finetune.DenoiserFinetuning`'s, as for every backend: LoRA (peft adapters
injected into the UNet in place, reference = adapters off) or full (reference = a frozen copy, ``reference_dtype``).
Weights: ``pytorch_lora_weights.safetensors`` (keys ``denoiser.<peft key>``) or ``denoiser.safetensors`` (the UNet's
state dict); LoRA folders written before, as ``denoiser_lora.safetensors`` with peft-wrapper keys, still load.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import seed_list
from videotuna_dpo.models.finetune import (ATTENTION_PROJECTIONS, LoraSchema, check_finetune, dtype_setting, eval_mode,
                                          lora_field)
from videotuna_dpo.models.videotuna_host import (VideoTunaFlowBackend, build_flow, flow_section, import_videotuna,
                                                 load_into, load_vc2_components, set_host_checkpointing)

LEGACY_LORA_FILE = "denoiser_lora.safetensors"  # what this backend wrote before it shared DenoiserFinetuning
VC2_CHECKPOINT_KEYS = (
    "model.host_config at VideoTuna's VC2 flow YAML (configs/001_videocrafter2/vc2_t2v_320x512.yaml) "
    "and model.ckpt at VideoCrafter2's model.ckpt (checkpoints/videocrafter/t2v_v2_512/model.ckpt) or "
    "a VideoTuna split folder (checkpoints/videocrafter/t2v_v2_512_split)"
)


@dataclass
class VC2HostSchema:
    """The ``model:`` keys VC2 and T2V-Turbo share (both build VideoTuna's ``VideocrafterFlow``); each adds its own."""

    name: str = "???"
    host_config: Optional[str] = None  # VideoTuna YAML whose `flow:` builds VC2 (path, or relative to the checkout)
    flow: Optional[dict[str, Any]] = None  # or the flow section inline (target + params)
    ckpt: Optional[str] = None  # VC2 model.ckpt or a VideoTuna split folder (inside VideoTuna: train.ckpt)
    denoiser_ckpt: Optional[str] = None  # a full denoiser checkpoint replacing ckpt's UNet (VideoTuna's --trained_ckpt)
    trust_checkpoint: bool = False  # allow full unpickling of ckpt (and T2V-Turbo's lora_ckpt): runs code in the files
    gradient_checkpointing: Optional[bool] = None  # every UNet block's checkpoint switch; null: as the host config (VC2: on)
    trainable_weights: Optional[str] = None  # a run's weights/<step> folder to start from / sample with
    init_weights: Optional[str] = None  # an SFT weights folder merged into the base: the reference
    load_text_and_vae: bool = True  # false when training on a latent cache: VAE/text weights are not loaded
    fps: int = 28  # fps condition for generate (VideoTuna's VC2 inference setting)


@dataclass
class VideoCrafter2Schema(VC2HostSchema):
    name: str = "videocrafter2"
    finetune: str = "full"  # full (the paper: frozen reference copy) | lora (reference = adapters off)
    lora: LoraSchema = lora_field(16, ATTENTION_PROJECTIONS)  # the UNet's attention projections, rank 16
    reference_on_cpu: bool = False  # full: keep the frozen copy on CPU, move it in per step
    reference_dtype: str = "fp32"  # full: dtype of the frozen copy (bf16 halves its memory; runs under autocast)
    ddim_eta: float = 1.0  # generate: DDIM eta (the paper sampled with 1.0)


class VideoCrafter2Backend(VideoTunaFlowBackend, nn.Module):
    """VC2 as a DPO backend: eps target, VC2 input scaling, full fine-tune (paper) or LoRA."""

    family = "videocrafter2"
    legacy_lora_files = ((LEGACY_LORA_FILE, "denoiser"),)
    checkpoint_keys = VC2_CHECKPOINT_KEYS
    train_ckpt_hint = ("VideoCrafter2's model.ckpt or a VideoTuna split folder "
                       "(checkpoints/videocrafter/t2v_v2_512_split)")

    schema: type = VideoCrafter2Schema
    # lvdm's UNetModel names no _no_split_modules; each of its input, middle and output blocks (a ResBlock with
    # its spatial and temporal transformers) is a TimestepEmbedSequential: FSDP's unit (strategy.wrap_blocks).
    fsdp_blocks = ("TimestepEmbedSequential",)

    def __init__(self, cfg: VideoCrafter2Schema | Any, flow: Any = None):
        super().__init__()
        self.cfg = cfg
        self.check_choices()
        if flow is None:
            section = flow_section(cfg.host_config, cfg.flow, "model")
            if "lora_config" in section.get("params", {}):
                raise UserError("model: drop flow.params.lora_config from the host config; set model.finetune=lora "
                                "and model.lora instead (the adapters are added after the base weights load)")
            flow = build_flow(section, self.family, self.checkpoint_keys)
        self.refuse_host_lora(flow)
        self.flow = flow
        if getattr(flow, "parameterization", "eps") not in ("eps", "v", "x0"):
            raise UserError(f"model: unsupported parameterization {flow.parameterization!r}")
        if cfg.ckpt:
            self.load_pretrained(cfg.ckpt, cfg.denoiser_ckpt)
        self.setup_finetune()
        self.gradient_checkpointing = set_host_checkpointing(self.flow.denoiser, cfg.gradient_checkpointing, self.family)
        if cfg.trainable_weights:
            self.load_trainable(cfg.trainable_weights)

    @classmethod
    def check_flow_section(cls, section: Any, key: str) -> Any:
        """The VideoTuna flow section as given: VC2's weights load after the flow is built (``ckpt``)."""
        return section

    def check_choices(self) -> None:
        """The settings' choices, before any weight loads."""
        check_finetune(self.cfg.finetune)
        self.reference_dtype = dtype_setting("model.reference_dtype", self.cfg.reference_dtype)

    # -- construction -----------------------------------------------------------------------------
    def load_pretrained(self, ckpt: str | Path, denoiser_ckpt: str | Path | None = None) -> None:
        """Base weights from VC2's ``model.ckpt`` or a split folder (``weights_only`` unless trusted)."""
        components = ("denoiser", "first_stage_model", "cond_stage_model") if self.cfg.load_text_and_vae else ("denoiser",)
        states = load_vc2_components(ckpt, "model.trust_checkpoint", self.cfg.trust_checkpoint, components)
        if denoiser_ckpt:
            states.update(load_vc2_components(denoiser_ckpt, "model.trust_checkpoint",
                                              self.cfg.trust_checkpoint, ("denoiser",)))
        for name, state in states.items():
            load_into(getattr(self.flow, name), state, f"{ckpt} ({name})")

    def setup_finetune(self) -> None:
        """The first stage and text encoder frozen; the UNet fine-tuned as ``model.finetune`` says (the mixin's)."""
        self.setup_host_finetuning(reference_dtype=self.reference_dtype)

    # -- the protocol -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` in [-1, 1] -> latents ``[B, 4, F, H/8, W/8]`` (times scale_factor)."""
        return self.flow.encode_first_stage(pixels.float()).float()

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, F, H, W]`` in [-1, 1] -> the first stage's posterior (mean, std), each ``[B, 4, F, H/8, W/8]``.

        Frame by frame, as the host's 2D-VAE ``encode_first_stage``, times ``scale_factor``: ``mean + std * eps``
        is distributed as ``encode_video``. VC2's ``scale_arr`` is not applied here; the training step applies it.
        """
        flow = self.flow
        means, stds = [], []
        for i in range(pixels.shape[2]):
            posterior = flow.first_stage_model.encode(pixels[:, :, i].float())
            means.append(posterior.mean * flow.scale_factor)
            stds.append(posterior.std * flow.scale_factor)
        return torch.stack(means, 2).float(), torch.stack(stds, 2).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 4, F, h, w]`` -> pixels ``[B, C, F, H, W]`` in [-1, 1]."""
        return self.flow.decode_first_stage(latents).float()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> the flow's text embeddings ``[B, L, D]``."""
        return self.flow.get_learned_conditioning(list(prompts)).float()

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Uniform integer timesteps in [0, num_timesteps), as the host's forward draws them."""
        return torch.randint(0, self.flow.num_timesteps, (n,), device=device, dtype=torch.long)

    def scale_input(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """VC2's dynamic input scaling: ``x0 * scale_arr[t]`` when the flow has ``use_scale``."""
        if not getattr(self.flow, "use_scale", False):
            return x0
        scale = self.flow.scale_arr.to(x0.device)[t].to(x0.dtype)
        return x0 * scale.reshape(-1, *([1] * (x0.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.flow.scheduler.q_sample(x_start=self.scale_input(x0, t), t=t, noise=noise)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.flow.parameterization
        if kind == "eps":
            return noise
        x0 = self.scale_input(x0, t)
        return x0 if kind == "x0" else self.flow.scheduler.get_v(x0, noise, t)

    def _predict_with(self, net: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The host's ``apply_model`` with ``net`` as its UNet -> prediction ``[B, 4, F, h, w]``.

        A reference copy in bf16/fp16 (``model.reference_dtype``) runs under autocast: the host's UNet does not cast
        its inputs.
        """
        dtype = next(net.parameters()).dtype
        autocast = torch.autocast(noisy.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with self._host_unet(net), autocast:
            return self.flow.apply_model(noisy, t, cond).float()

    @contextmanager
    def _host_unet(self, net: nn.Module) -> Iterator[None]:
        """The host's wrapper (``flow.model``) calls ``net`` while inside, the policy UNet again after."""
        wrapper = self.flow.model
        policy, wrapper.diffusion_model = wrapper.diffusion_model, net
        try:
            yield
        finally:
            wrapper.diffusion_model = policy

    @torch.no_grad()
    def generate(self, prompts: list[str], num_frames: int | None = None, steps: int = 50, guidance: float = 12.0,
                 seed: int | list[int] = 0, height: int | None = None, width: int | None = None,
                 negative_prompt: str = "") -> torch.Tensor:
        """The host's DDIM sampler (``sample_batch_t2v``; 50 steps, eta 1.0, guidance 12) -> ``[B, F, C, H, W]`` in [0, 1].

        Each prompt is sampled with its own seed (a list, one per prompt; an int ``s`` means ``s, s+1, ...``):
        the host's DDIM draws its eta noise for the whole batch from the global generator, so a video is the
        same whatever its batch only when each is sampled on its own.
        """
        seeds = seed_list(seed, len(prompts))
        sampler_module = import_videotuna("videotuna.schedulers.ddim", self.family, self.checkpoint_keys)
        flow = self.flow
        h, w = (height // 8 if height else flow.image_size[0]), (width // 8 if width else flow.image_size[1])
        frames = num_frames or flow.temporal_length
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        videos = []
        with eval_mode(flow.denoiser):
            flow.ddim_sampler = sampler_module.DDIMSampler(flow)
            for prompt, s in zip(prompts, seeds):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(s)
                    video = flow.sample_batch_t2v([prompt], self.cfg.fps, noise_shape=[1, flow.channels, frames, h, w],
                                                  n_samples_prompt=1, ddim_steps=steps, ddim_eta=self.cfg.ddim_eta,
                                                  cfg_scale=guidance, uncond_prompt=negative_prompt or "")
                videos.append(video[:, 0].float())  # [1, C, F, H, W] in [-1, 1]
        videos = torch.cat(videos)
        return ((videos.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).contiguous()

