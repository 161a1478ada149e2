"""VideoCrafter2 through VideoTuna's own ``VideocrafterFlow`` (its model zoo, not a copy of it).

Latent layout: ``[B, 4, F, H/8, W/8]`` (VideoTuna's 2D VAE applied frame by frame, times
``scale_factor``); prompt conditioning ``[B, 77, 1024]`` from the flow's ``cond_stage_model``.
eps-prediction; VC2's timestep-dependent input scaling (``use_scale``/``scale_arr``) is applied to
x0 before noising exactly as the host's ``VideocrafterFlow.forward`` does.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from videotuna_dpo.config import validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import (PredictFn, atomic_directory, init_weights_id, read_safetensors, read_trainable_meta,
                                      seed_list)
from videotuna_dpo.models.finetune import NO_REFERENCE_COPY, eval_mode, merge_lora, reference_copy_wanted
from videotuna_dpo.models.videotuna_host import (build_flow, flow_section, import_videotuna, load_into,
                                                 load_vc2_components, set_host_checkpointing)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_FILE = "denoiser.safetensors"
LORA_FILE = "denoiser_lora.safetensors"
VC2_CHECKPOINT_KEYS = (
    "model.host_config at VideoTuna's VC2 flow YAML (configs/001_videocrafter2/vc2_t2v_320x512.yaml) "
    "and model.ckpt at VideoCrafter2's model.ckpt (checkpoints/videocrafter/t2v_v2_512/model.ckpt) or "
    "a VideoTuna split folder (checkpoints/videocrafter/t2v_v2_512_split)"
)


@dataclass
class VC2LoraSchema:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class VideoCrafter2Schema:
    name: str = "videocrafter2"
    host_config: Optional[str] = None  # VideoTuna YAML whose `flow:` builds VC2 (path, or relative to the checkout)
    flow: Optional[dict[str, Any]] = None  # or the flow section inline (target + params)
    ckpt: Optional[str] = None  # VC2 model.ckpt or a VideoTuna split folder; required unless weights come later
    denoiser_ckpt: Optional[str] = None  # a full denoiser checkpoint replacing ckpt's UNet (VideoTuna's --trained_ckpt)
    trust_checkpoint: bool = False  # allow full unpickling of ckpt (runs code in the file)
    finetune: str = "full"  # full (the paper: frozen reference copy) | lora (reference = adapters off)
    lora: VC2LoraSchema = field(default_factory=VC2LoraSchema)
    reference_on_cpu: bool = False  # full: keep the frozen copy on CPU, move it in per step
    reference_dtype: str = "fp32"  # full: dtype of the frozen copy (bf16 halves its memory; runs under autocast)
    gradient_checkpointing: Optional[bool] = None  # every UNet block's checkpoint switch; null: as the host config (VC2: on)
    trainable_weights: Optional[str] = None  # a run's weights/<step> folder to start from / sample with
    init_weights: Optional[str] = None  # an SFT weights folder (LoRA or full) merged into the base: the reference
    load_text_and_vae: bool = True  # false when training on a latent cache: VAE/text weights are not loaded
    fps: int = 28  # fps condition for generate (VideoTuna's VC2 inference setting)
    ddim_eta: float = 1.0  # generate: DDIM eta (the paper sampled with 1.0)


class VideoCrafter2Backend(nn.Module):
    """VC2 as a DPO backend: eps target, VC2 input scaling, full fine-tune (paper) or LoRA."""

    family = "videocrafter2"
    checkpoint_keys = VC2_CHECKPOINT_KEYS
    train_ckpt_hint = ("VideoCrafter2's model.ckpt or a VideoTuna split folder "
                       "(checkpoints/videocrafter/t2v_v2_512_split)")

    schema: type = VideoCrafter2Schema

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
        if getattr(flow, "use_lora", False):
            raise UserError("model: the VideoTuna flow already carries a lora_config; remove it and use "
                            "model.finetune / model.lora (adapters are added after the base weights load)")
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
    def from_config(cls, model_cfg: Any, source: str = "<config>", flow: Any = None) -> "VideoCrafter2Backend":
        if flow is None:  # without VideoTuna, say so before asking for keys that point into it (host_config, ckpt)
            import_videotuna("videotuna", cls.family, cls.checkpoint_keys)
        cfg = validate(model_cfg, cls.schema, "model", source)
        if flow is None and not cfg.ckpt:
            raise UserError(f"{source}: missing required key model.ckpt; point {cls.checkpoint_keys}")
        return cls(cfg, flow=flow)

    @classmethod
    def check_flow_section(cls, section: Any, key: str) -> Any:
        """The VideoTuna flow section as given: VC2's weights load after the flow is built (``ckpt``)."""
        return section

    def check_choices(self) -> None:
        if self.cfg.finetune not in ("full", "lora"):
            raise UserError(f"model.finetune must be 'full' or 'lora', got {self.cfg.finetune!r}")
        if self.cfg.reference_dtype not in DTYPES:
            raise UserError(f"model.reference_dtype must be one of {', '.join(DTYPES)}, got {self.cfg.reference_dtype!r}")

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
        """LoRA: peft adapters on the denoiser; full: the whole denoiser trains, a frozen copy is the reference."""
        flow = self.flow
        self._ref_cpu: list[nn.Module] = []  # a CPU-resident reference is kept out of .to(device)
        self.ref_denoiser: nn.Module | None = None
        self.reference_copy_skipped = self.cfg.finetune == "full" and not reference_copy_wanted()
        for module in (flow.first_stage_model, flow.cond_stage_model):
            module.requires_grad_(False).eval()
        flow.denoiser.requires_grad_(False)
        if self.cfg.init_weights:
            self.merge_init_weights(self.cfg.init_weights)
        if self.cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lora = self.cfg.lora
            flow.denoiser = get_peft_model(flow.denoiser, LoraConfig(
                r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules), init_lora_weights=True))
            flow.model.diffusion_model = flow.denoiser
            # What the host's GenerationBase.instantiate_lora sets, so its set_trainable_components agrees.
            flow.use_lora = True
            flow.lora_params = {n for n, p in flow.denoiser.named_parameters() if "lora_" in n}
        elif not self.reference_copy_skipped:
            reference = copy.deepcopy(flow.denoiser).to(DTYPES[self.cfg.reference_dtype]).requires_grad_(False).eval()
            if self.cfg.reference_on_cpu:
                self._ref_cpu.append(reference)
            else:
                self.ref_denoiser = reference
        self.restore_trainable()

    def restore_trainable(self) -> None:
        """Re-assert exactly which parameters train (after the host's set_trainable_components)."""
        denoiser = self.flow.denoiser
        if self.cfg.finetune == "lora":
            denoiser.requires_grad_(False)
            for name, p in denoiser.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            denoiser.requires_grad_(True)
        denoiser.train()

    def merge_init_weights(self, directory: str | Path) -> None:
        """``model.init_weights``: a VC2 weights folder (LoRA or full, e.g. an SFT run's) made part of the base.

        It runs before the DPO adapter or the reference copy exists, so the reference is that model.
        """
        directory = Path(directory)
        meta = read_trainable_meta(directory, self.family)
        what = f"model.init_weights={directory}"
        if meta.get("finetune") == "lora":
            merge_lora(self.flow.denoiser, read_safetensors(directory, LORA_FILE), meta["lora"], what)
        else:
            load_into(self.flow.denoiser, read_safetensors(directory, FULL_FILE), what)

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

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The host's ``apply_model`` -> prediction ``[B, 4, F, h, w]``."""
        return self.flow.apply_model(noisy, t, cond).float()

    @contextmanager
    def reference(self) -> Iterator[PredictFn]:
        """LoRA: adapters disabled; full: the frozen copy swapped into the host's wrapper. Always in eval mode.

        VC2's temporal convolutions carry dropout (p=0.1); the reference must be deterministic.
        """
        if self.cfg.finetune == "lora":
            with self.flow.denoiser.disable_adapter(), eval_mode(self.flow.denoiser):
                yield self.predict
            return
        if self.reference_copy_skipped:
            raise UserError(f"{type(self).__name__} {NO_REFERENCE_COPY}")
        reference = self.ref_denoiser if self.ref_denoiser is not None else self._ref_cpu[0]
        reference.eval()  # the Trainer's .train() on the whole module reaches the copy too
        device = next(self.flow.denoiser.parameters()).device
        moved = reference is not self.ref_denoiser
        if moved:
            reference.to(device)
        wrapper = self.flow.model
        policy, wrapper.diffusion_model = wrapper.diffusion_model, reference
        dtype = DTYPES[self.cfg.reference_dtype]
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        try:
            with autocast:
                yield self.predict
        finally:
            wrapper.diffusion_model = policy
            if moved:
                reference.to("cpu")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.flow.denoiser.parameters() if p.requires_grad]

    def save_trainable(self, directory: str | Path) -> Path:
        """LoRA: peft adapter tensors; full: the denoiser's state dict (safetensors)."""
        from safetensors.torch import save_file

        meta = {"family": self.family, "finetune": self.cfg.finetune, "base": str(self.cfg.ckpt),
                "init_weights": init_weights_id(self.cfg)}
        if self.cfg.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            meta["lora"] = {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                            "target_modules": list(self.cfg.lora.target_modules)}
            tensors, name = get_peft_model_state_dict(self.flow.denoiser), LORA_FILE
        else:
            tensors, name = self.flow.denoiser.state_dict(), FULL_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        return atomic_directory(directory, lambda tmp: save_file(tensors, str(tmp / name)), meta)

    def load_trainable(self, directory: str | Path) -> None:
        directory = Path(directory)
        read_trainable_meta(directory, self.family, self.cfg)
        if self.cfg.finetune == "lora":
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.flow.denoiser, read_safetensors(directory, LORA_FILE))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise UserError(f"{directory / LORA_FILE}: keys not in this model's LoRA: {unexpected[:5]}")
        else:
            load_into(self.flow.denoiser, read_safetensors(directory, FULL_FILE), str(directory / FULL_FILE))

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

