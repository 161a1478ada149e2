"""T2V-Turbo: VideoCrafter2 (through VideoTuna) plus T2V-Turbo's LCM LoRA as the starting policy.

``unet_lora.pt`` is T2V-Turbo's list ``[up_0, down_0, up_1, down_1, ...]``, one pair per
``nn.Linear``/``nn.Conv2d``/``nn.Conv3d`` of the UNet in module order (rank 64), including the
``time_cond_proj`` layer T2V-Turbo adds for its guidance-scale embedding. The policy trains that
LoRA; the reference is the same LoRA frozen, stored as a second set of adapter tensors only.
Training timesteps lie on the 50-step DDIM grid and VC2's input scaling is off, as in T2V-Turbo's
own training and the official VideoDPO T2V-Turbo run. Latents and conditioning are VC2's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from videotuna_dpo.checkpoint_io import load_weights
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import (PredictFn, atomic_directory, init_weights_id, read_safetensors, read_trainable_meta,
                                      seed_list)
from videotuna_dpo.models.finetune import eval_mode
from videotuna_dpo.models.videocrafter import VC2HostSchema, VideoCrafter2Backend

LORA_LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.Conv3d)
TRAINABLE_FILE = "unet_lora.safetensors"
EXPORT_FILE = "unet_lora.pt"  # the same adapters in T2V-Turbo's own list format
T2V_TURBO_CHECKPOINT_KEYS = (
    "model.host_config at VideoTuna's VC2 flow YAML (configs/001_videocrafter2/vc2_t2v_320x512.yaml), "
    "model.ckpt at VideoCrafter2's model.ckpt (checkpoints/videocrafter/t2v_v2_512/model.ckpt) and "
    "model.lora_ckpt at T2V-Turbo's unet_lora.pt (checkpoints/t2v-turbo/unet_lora.pt)"
)


@dataclass
class T2VTurboSchema(VC2HostSchema):
    name: str = "t2v_turbo"
    lora_ckpt: Optional[str] = None  # T2V-Turbo's unet_lora.pt (the starting policy and the reference)
    lora_rank: int = 64  # T2V-Turbo's rank
    lora_dropout: float = 0.0  # T2V-Turbo's layers default to 0.1; 0 keeps policy == reference at step 0
    time_cond_proj_dim: Optional[int] = 256  # T2V-Turbo's guidance-embedding projection (null: none)
    num_ddim_timesteps: int = 50  # training timesteps are drawn from this DDIM grid
    input_scaling: bool = False  # VC2's scale_arr; T2V-Turbo trained without it
    init_weights: Optional[str] = None  # a T2V-Turbo weights folder replacing lora_ckpt for policy and reference
    fps: int = 16  # fps condition for generate (T2V-Turbo's default)
    lcm_origin_steps: int = 50  # the DDIM grid the LCM sampler skips along


class PairedLoRA(nn.Module):
    """A frozen base layer with two adapters of one shape: the trained policy and the frozen reference."""

    def __init__(self, base: nn.Module, rank: int, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        if isinstance(base, nn.Linear):
            r = min(rank, base.in_features, base.out_features)

            def make():
                return nn.Linear(base.in_features, r, bias=False), nn.Linear(r, base.out_features, bias=False)
        else:
            if base.groups != 1:
                raise UserError(f"LoRA on a grouped convolution ({base}) is not supported")
            r = min(rank, base.in_channels, base.out_channels)
            conv = type(base)

            def make():
                down = conv(base.in_channels, r, base.kernel_size, stride=base.stride, padding=base.padding,
                            dilation=base.dilation, bias=False)
                return down, conv(r, base.out_channels, 1, bias=False)
        self.rank = r
        self.lora_down, self.lora_up = make()
        self.ref_down, self.ref_up = make()
        nn.init.normal_(self.lora_down.weight, std=1.0 / r)
        nn.init.zeros_(self.lora_up.weight)
        self.ref_down.load_state_dict(self.lora_down.state_dict())
        self.ref_up.load_state_dict(self.lora_up.state_dict())
        self.ref_down.requires_grad_(False)
        self.ref_up.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.use_reference = False

    def set_pair(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Load one (up, down) pair into both the policy and the reference adapters."""
        with torch.no_grad():
            for layer, value in ((self.lora_up, up), (self.ref_up, up), (self.lora_down, down), (self.ref_down, down)):
                layer.weight.copy_(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_reference:
            return self.base(x) + self.ref_up(self.ref_down(x))
        return self.base(x) + self.dropout(self.lora_up(self.lora_down(x)))


def lora_targets(denoiser: nn.Module) -> list[tuple[str, nn.Module]]:
    """T2V-Turbo's LoRA order: every exact Linear/Conv2d/Conv3d of the UNet, in module order."""
    return [(name, m) for name, m in denoiser.named_modules() if type(m) in LORA_LAYER_TYPES]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of guidance scales ``w`` [B] (scaled by 1000) -> ``[B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def ddim_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The DDIM solver's timesteps ``[k-1, 2k-1, ..., T-1]`` with ``k = T // n``."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * k - 1


class T2VTurboBackend(VideoCrafter2Backend):
    """T2V-Turbo (VC2 + LCM LoRA): trains the LoRA, reference = the LoRA frozen, DDIM-grid timesteps."""

    family = "t2v_turbo"
    schema = T2VTurboSchema
    checkpoint_keys = T2V_TURBO_CHECKPOINT_KEYS

    def check_choices(self) -> None:
        if not self.cfg.lora_ckpt:
            raise UserError(f"missing required key model.lora_ckpt; point {T2V_TURBO_CHECKPOINT_KEYS}")
        if self.cfg.num_ddim_timesteps < 1:
            raise UserError(f"model.num_ddim_timesteps must be >= 1, got {self.cfg.num_ddim_timesteps}")

    # -- construction -----------------------------------------------------------------------------
    def setup_finetune(self) -> None:
        """T2V-Turbo's paired adapters on every Linear/Conv of the UNet, from ``lora_ckpt`` (not the mixin's LoRA)."""
        flow = self.flow
        self.freeze_text_and_vae()
        denoiser = flow.denoiser.requires_grad_(False)
        if self.cfg.time_cond_proj_dim:
            self._add_time_cond_proj(denoiser, int(self.cfg.time_cond_proj_dim))
        self.lora_names: list[str] = []
        for name, module in lora_targets(denoiser):
            parent_name, _, leaf = name.rpartition(".")
            parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
            parent._modules[leaf] = PairedLoRA(module, self.cfg.lora_rank, self.cfg.lora_dropout)
            self.lora_names.append(name)
        self.load_turbo_lora(self.cfg.lora_ckpt)
        if self.cfg.init_weights:
            self._load_adapters(self.cfg.init_weights, reference=True)
        self.register_buffer("ddim_timesteps", ddim_grid(flow.num_timesteps, self.cfg.num_ddim_timesteps),
                             persistent=False)
        self.restore_trainable()

    def _add_time_cond_proj(self, denoiser: nn.Module, dim: int) -> None:
        """T2V-Turbo's ``time_cond_proj`` (w-embedding -> model_channels), added to ``t_emb`` before ``time_embed``."""
        width = denoiser.time_embed[0].in_features
        # T2V-Turbo ships this layer's LoRA but not its base weight; a zero base leaves only the LoRA.
        proj = nn.Linear(dim, width, bias=False)
        nn.init.zeros_(proj.weight)
        # Registered right after the time/fps embeddings so module order matches T2V-Turbo's UNet.
        anchor = "fps_embedding" if "fps_embedding" in denoiser._modules else "time_embed"
        items = list(denoiser._modules.items())
        at = [k for k, _ in items].index(anchor) + 1
        denoiser._modules = dict(items[:at] + [("time_cond_proj", proj)] + items[at:])
        self._w_embedding: torch.Tensor | None = None

        def add_guidance(module: nn.Module, args: tuple) -> tuple | None:
            if self._w_embedding is None:
                return None  # training, as the official DPO run: no guidance embedding
            t_emb = args[0]
            return (t_emb + denoiser.time_cond_proj(self._w_embedding.to(t_emb)),)

        denoiser.time_embed.register_forward_pre_hook(add_guidance)

    def load_turbo_lora(self, path: str | Path) -> None:
        """T2V-Turbo's ``unet_lora.pt`` into both adapter sets (``weights_only`` unless trusted)."""
        loras = load_weights(path, "model.trust_checkpoint", self.cfg.trust_checkpoint)
        layers = [self.flow.denoiser.get_submodule(n) for n in self.lora_names]
        if not isinstance(loras, (list, tuple)) or len(loras) != 2 * len(layers):
            got = f"{len(loras)} tensors" if isinstance(loras, (list, tuple)) else type(loras).__name__
            raise UserError(
                f"{path}: expected T2V-Turbo's list of {2 * len(layers)} LoRA tensors (up, down per layer for "
                f"the {len(layers)} Linear/Conv layers of this UNet, time_cond_proj included), got {got}; "
                f"check model.host_config (VC2 320x512 UNet) and model.time_cond_proj_dim (256)"
            )
        for i, (name, layer) in enumerate(zip(self.lora_names, layers)):
            up, down = loras[2 * i], loras[2 * i + 1]
            if tuple(up.shape) != tuple(layer.lora_up.weight.shape) or tuple(down.shape) != tuple(layer.lora_down.weight.shape):
                raise UserError(
                    f"{path}: LoRA pair {i} (layer {name}) has up {tuple(up.shape)} / down {tuple(down.shape)} but the "
                    f"layer needs {tuple(layer.lora_up.weight.shape)} / {tuple(layer.lora_down.weight.shape)} "
                    f"(model.lora_rank={self.cfg.lora_rank})"
                )
            layer.set_pair(up, down)

    def restore_trainable(self) -> None:
        """Only the adapters the loss reaches train: ``time_cond_proj``'s stays frozen (no guidance input in training).

        Under DDP a trainable parameter without a gradient stops the run, so the trainable set is exactly
        what the training step uses.
        """
        denoiser = self.flow.denoiser
        denoiser.requires_grad_(False)
        for layer in self._trained_layers():
            layer.lora_up.requires_grad_(True)
            layer.lora_down.requires_grad_(True)
        denoiser.train()

    def _lora_layers(self) -> list[PairedLoRA]:
        return [m for m in self.flow.denoiser.modules() if isinstance(m, PairedLoRA)]

    def _trained_layers(self) -> list[PairedLoRA]:
        """The adapters DPO trains: all but the guidance projection's, which training never calls."""
        return [m for name, m in self.flow.denoiser.named_modules()
                if isinstance(m, PairedLoRA) and name != "time_cond_proj"]

    # -- the protocol -----------------------------------------------------------------------------
    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Timesteps drawn uniformly from the DDIM grid ``[19, 39, ..., 999]``."""
        index = torch.randint(0, len(self.ddim_timesteps), (n,), device=device)
        return self.ddim_timesteps.to(device)[index]

    def scale_input(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().scale_input(x0, t) if self.cfg.input_scaling else x0

    @contextmanager
    def reference(self) -> Iterator[PredictFn]:
        """The same UNet, in eval mode, with every layer switched to its frozen copy of the starting LoRA."""
        layers = self._lora_layers()
        for layer in layers:
            layer.use_reference = True
        try:
            with eval_mode(self.flow.denoiser):
                yield self.predict
        finally:
            for layer in layers:
                layer.use_reference = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self._trained_layers() for p in (layer.lora_up.weight, layer.lora_down.weight)]

    def reference_parameters(self) -> list[torch.Tensor]:
        """Everything the reference holds beyond the shared base: its adapter tensors."""
        return [p for layer in self._lora_layers() for p in (layer.ref_up.weight, layer.ref_down.weight)]

    def save_trainable(self, directory: str | Path) -> Path:
        """Policy adapters as safetensors plus ``unet_lora.pt`` in T2V-Turbo's list format."""
        from safetensors.torch import save_file

        layers = self._lora_layers()
        tensors = {}
        for i, layer in enumerate(layers):
            tensors[f"{i:04d}.up"] = layer.lora_up.weight.detach().cpu().contiguous()
            tensors[f"{i:04d}.down"] = layer.lora_down.weight.detach().cpu().contiguous()
        meta = {"family": self.family, "finetune": "lora", "base": str(self.cfg.ckpt),
                "start_lora": str(self.cfg.lora_ckpt), "rank": self.cfg.lora_rank, "layers": self.lora_names,
                "init_weights": init_weights_id(self.cfg)}

        def write(tmp: Path) -> None:
            save_file(tensors, str(tmp / TRAINABLE_FILE))
            torch.save([tensors[f"{i:04d}.{k}"] for i in range(len(layers)) for k in ("up", "down")], tmp / EXPORT_FILE)

        return atomic_directory(directory, write, meta)

    def load_trainable(self, directory: str | Path) -> None:
        """Policy adapters from ``save_trainable``; the reference keeps the starting LoRA."""
        self._load_adapters(directory, reference=False)

    def _load_adapters(self, directory: str | Path, reference: bool) -> None:
        """A ``save_trainable`` folder into the policy adapters, or (``init_weights``) into policy and reference."""
        directory = Path(directory)
        meta = read_trainable_meta(directory, cfg=None if reference else self.cfg)
        if meta.get("family") != self.family or meta.get("layers") != self.lora_names:
            raise UserError(f"{directory}: holds {meta.get('family')} LoRA for other layers than this T2V-Turbo UNet; "
                            f"use the host config it was trained with")
        tensors = read_safetensors(directory, TRAINABLE_FILE)
        for i, layer in enumerate(self._lora_layers()):
            if reference:
                layer.set_pair(tensors[f"{i:04d}.up"], tensors[f"{i:04d}.down"])
                continue
            with torch.no_grad():
                layer.lora_up.weight.copy_(tensors[f"{i:04d}.up"])
                layer.lora_down.weight.copy_(tensors[f"{i:04d}.down"])

    @contextmanager
    def guidance(self, w: torch.Tensor | None) -> Iterator[None]:
        """Condition the UNet on guidance scales ``w`` [B] through ``time_cond_proj`` while inside."""
        if not self.cfg.time_cond_proj_dim or w is None:
            yield
            return
        self._w_embedding = guidance_embedding(w, int(self.cfg.time_cond_proj_dim))
        try:
            yield
        finally:
            self._w_embedding = None

    @torch.no_grad()
    def generate(self, prompts: list[str], num_frames: int | None = None, steps: int = 4, guidance: float = 7.5,
                 seed: int | list[int] = 0, height: int | None = None, width: int | None = None,
                 **_: Any) -> torch.Tensor:
        """T2V-Turbo's few-step LCM sampling (4 steps, guidance 7.5 by default) -> ``[B, F, C, H, W]`` in [0, 1].

        Video i draws all its noise from its own generator seeded with ``seed[i]``: it is the same whatever its batch.
        """
        flow = self.flow
        if not 1 <= steps <= self.cfg.lcm_origin_steps:
            raise UserError(f"steps must be in 1..{self.cfg.lcm_origin_steps} for the LCM sampler, got {steps}")
        device = next(flow.denoiser.parameters()).device
        b = len(prompts)
        h, w = (height // 8 if height else flow.image_size[0]), (width // 8 if width else flow.image_size[1])
        shape = (flow.channels, num_frames or flow.temporal_length, h, w)  # one video
        grid = ddim_grid(flow.num_timesteps, self.cfg.lcm_origin_steps)
        timesteps = grid.flip(0)[:: self.cfg.lcm_origin_steps // steps][:steps].tolist()
        alphas = flow.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        generators = [torch.Generator(device=device).manual_seed(s) for s in seed_list(seed, b)]

        def randn() -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])

        cond = self.encode_prompt(list(prompts)).to(device)
        fps = torch.full((b,), self.cfg.fps, device=device, dtype=torch.long)
        x = randn()
        with eval_mode(flow.denoiser), self.guidance(torch.full((b,), float(guidance))):
            for i, t in enumerate(timesteps):
                ts = torch.full((b,), t, device=device, dtype=torch.long)
                eps = flow.apply_model(x, ts, cond, fps=fps).float()
                a_t = alphas[t]
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                # LCM boundary condition (sigma_data 0.5, timestep scaling 10).
                scaled = t * 10.0
                c_skip = 0.25 / (scaled**2 + 0.25)
                c_out = scaled / math.sqrt(scaled**2 + 0.25)
                denoised = c_out * x0 + c_skip * x
                if i + 1 < len(timesteps):
                    a_prev = alphas[timesteps[i + 1]]
                    x = a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * randn()
        videos = self.decode_latents(denoised)  # [B, C, F, H, W] in [-1, 1]
        return ((videos.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).contiguous()
