"""Wan2.1 text-to-video through VideoTuna's own ``WanVideoModelFlow`` (its vendored Wan code, not a copy).

The flow holds ``denoiser`` (``WanModel``), ``first_stage_model`` (``WanVAE_``), ``cond_stage_model`` (umT5
``T5Encoder``) and ``wan_t2v`` (``WanT2V``: the VAE wrapper with its latent statistics, the T5 wrapper with
its tokenizer, the task config). Latent layout: ``[B, 16, 1 + (F - 1) / 4, H / 8, W / 8]``, the VAE's
normalised posterior mean (the host trains on the mean, so the cache stores a zero std). Prompt
conditioning: ``[B, text_len, 4096]``, each caption's umT5 tokens then zeros (what ``WanModel`` pads to).
Rectified flow as the host's ``WanT2V.training_step``: shift 5, ``x_t = (1 - s) x0 + s noise``, target
``noise - x0``, the transformer fed ``t = 1000 s`` with ``s`` drawn uniformly from the host's 1000-level grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import seed_list
from videotuna_dpo.models.finetune import LoraSchema, eval_mode, lora_field
from videotuna_dpo.models.flow_matching import FlowMatchingSchedule, FlowMatchingTraining, shift_sigmas
from videotuna_dpo.models.videotuna_host import VideoTunaFlowBackend, build_flow, flow_section, import_videotuna

FLOW_TARGET = "videotuna.flow.wanvideo.WanVideoModelFlow"
WAN_CHECKPOINT_KEYS = (
    "model.ckpt at a Wan2.1 checkpoint folder (checkpoints/wan/Wan2.1-T2V-1.3B: config.json and "
    "diffusion_pytorch_model*.safetensors, Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) "
    "and model.flow (or model.host_config) at a VideoTuna WanVideoModelFlow section "
    "(the flow_config of configs/videotuna/wan_dpo.yaml)"
)
HOST_TRAINING_SHIFT = 5.0  # WanT2V.training_step: FlowMatchScheduler(shift=5, sigma_min=0.0, extra_one_step=True)


@dataclass
class WanVideoTunaSchema:
    name: str = "wan_videotuna"
    host_config: Optional[str] = None  # VideoTuna YAML whose `flow:` is a WanVideoModelFlow (path, or in the checkout)
    flow: Optional[dict[str, Any]] = None  # or the flow section inline (target + params)
    ckpt: Optional[str] = None  # the Wan2.1 checkpoint folder (the flow's ckpt_path; VideoTuna's train.ckpt)
    denoiser_ckpt: Optional[str] = None  # a trained denoiser state dict replacing the folder's (--trained_ckpt)
    finetune: str = "lora"  # lora (reference = adapters off) | full (reference = frozen copy)
    lora: LoraSchema = lora_field(16, ["q", "k", "v", "o", "ffn.0", "ffn.2"])  # VideoTuna's own Wan LoRA
    reference_on_cpu: bool = False  # full: keep the frozen copy on CPU, move it in per step
    training_shift: float = HOST_TRAINING_SHIFT  # the flow shift of the training noise levels
    activation_checkpointing: bool = True  # WanModel.forward's own defaults while training
    grad_offload: bool = True  # checkpointed activations saved on the CPU
    trainable_weights: Optional[str] = None  # a run's weights/<step> folder to start from / sample with
    init_weights: Optional[str] = None  # an SFT weights folder (LoRA or full) merged into the base: the reference
    load_text_and_vae: bool = True  # false when training on a latent cache: the T5/VAE weights are not read
    sample_shift: float = 5.0  # generate: the sampler's flow shift (WanT2V.generate's default)
    sample_solver: str = "unipc"  # generate: Wan's FlowUniPCMultistepScheduler


class WanVideoTunaBackend(FlowMatchingTraining, VideoTunaFlowBackend, nn.Module):
    """Wan2.1 T2V as a DPO backend: flow velocity target, LoRA by default (VideoTuna's targets), full optional."""

    family = "wan_videotuna"
    checkpoint_keys = WAN_CHECKPOINT_KEYS
    train_ckpt_hint = ("the Wan2.1 checkpoint folder (checkpoints/wan/Wan2.1-T2V-1.3B), the same one as "
                       "flow.params.flow_config.params.ckpt_path (train.mapping copies it there)")
    schema: type = WanVideoTunaSchema

    def __init__(self, cfg: WanVideoTunaSchema | Any, flow: Any = None):
        super().__init__()
        self.cfg = cfg
        if cfg.sample_solver != "unipc":
            raise UserError(f"model.sample_solver must be 'unipc' (Wan's FlowUniPCMultistepScheduler), "
                            f"got {cfg.sample_solver!r}")
        if flow is None:
            section = self.check_flow_section(flow_section(cfg.host_config, cfg.flow, "model"), "model.flow",
                                              ckpt=cfg.ckpt)
            flow = build_flow(section, self.family, self.checkpoint_keys)
        elif cfg.ckpt and Path(str(flow.ckpt_path)).resolve() != Path(cfg.ckpt).resolve():
            raise UserError(
                f"train.ckpt={cfg.ckpt}, but the WanVideoModelFlow was built from ckpt_path={flow.ckpt_path} (its "
                f"WanModel, T5 and VAE load from there); point both at the same folder (train.mapping: "
                f"{{train.ckpt: flow.params.flow_config.params.ckpt_path}})")
        self.refuse_host_lora(flow)
        self.flow = flow
        self.flow_schedule = FlowMatchingSchedule(num_train_timesteps=int(flow.wan_t2v.num_train_timesteps),
                                                  shift=float(cfg.training_shift))
        self.text_and_vae_loaded = False
        if cfg.ckpt:
            self.load_pretrained()
        self.setup_host_finetuning()
        if cfg.trainable_weights:
            self.load_trainable(cfg.trainable_weights)

    @classmethod
    def check_flow_section(cls, section: Any, key: str, ckpt: str | None = None) -> Any:
        """A WanVideoModelFlow section whose ``ckpt_path`` (``ckpt`` when given) holds every file the task loads."""
        if str(section.get("target")) != FLOW_TARGET:
            raise UserError(f"{key}.target must be {FLOW_TARGET} for model.name={cls.family}, "
                            f"got {section.get('target')}")
        params = section.get("params") or {}
        if params.get("lora_config"):
            raise UserError(f"{key}.params.lora_config: drop it and set model.finetune=lora and model.lora instead "
                            f"(the adapters are added after the base weights load)")
        if ckpt:
            section = section.copy()
            section.params.ckpt_path = str(ckpt)
            denoiser = section.params.get("denoiser_config") or {}
            if denoiser.get("use_from_pretrained"):  # VideoTuna's Wan YAML: WanModel.from_pretrained(ckpt_path)
                section.params.denoiser_config.params.pretrained_model_name_or_path = str(ckpt)
            params = section.params
        folder = params.get("ckpt_path")
        if not folder:
            raise UserError(f"{key}.params.ckpt_path: the Wan2.1 checkpoint folder is required "
                            f"(e.g. checkpoints/wan/Wan2.1-T2V-1.3B)")
        configs = import_videotuna("videotuna.models.wan.wan.configs", cls.family, cls.checkpoint_keys)
        task = str(params.get("task", "t2v-14B"))
        if task not in configs.WAN_CONFIGS or not task.startswith("t2v"):
            raise UserError(f"{key}.params.task={task!r}: choose a text-to-video task "
                            f"({', '.join(t for t in configs.WAN_CONFIGS if t.startswith('t2v'))})")
        config = configs.WAN_CONFIGS[task]
        needed = [config.t5_checkpoint, config.vae_checkpoint, config.t5_tokenizer]
        denoiser = params.get("denoiser_config") or {}
        if denoiser.get("use_from_pretrained"):
            needed.append("config.json")
        missing = [name for name in needed if not (Path(str(folder)) / name).exists()]
        if missing:
            raise UserError(f"{key}.params.ckpt_path={folder}: not a {task} checkpoint folder; missing "
                            f"{', '.join(missing)} (download Wan-AI/Wan2.1-T2V-1.3B there)")
        return section

    # -- construction -----------------------------------------------------------------------------
    def load_pretrained(self) -> None:
        """The host's own ``from_pretrained``: umT5 and VAE weights, the optional trained denoiser.

        Without text and VAE (a latent-cache run) only the denoiser part runs. The WanModel itself was
        loaded by the flow's constructor (``denoiser_config.use_from_pretrained``).
        """
        ckpt, denoiser_ckpt = str(self.cfg.ckpt), self.cfg.denoiser_ckpt
        if denoiser_ckpt and not Path(denoiser_ckpt).is_file():
            raise UserError(f"model.denoiser_ckpt={denoiser_ckpt}: no such file")
        if self.cfg.load_text_and_vae:
            self.flow.from_pretrained(ckpt, denoiser_ckpt)
            self.text_and_vae_loaded = True
        else:
            self.flow.load_denoiser(ckpt, denoiser_ckpt, True)

    def _require_text_and_vae(self, what: str) -> None:
        if not self.text_and_vae_loaded:
            raise UserError(f"cannot {what}: the T5 and VAE weights were not loaded (model.load_text_and_vae=false, "
                            f"as when training from a latent cache, or no model.ckpt)")

    # -- the protocol -----------------------------------------------------------------------------
    def _vae_scale(self, like: torch.Tensor) -> list[torch.Tensor]:
        """The VAE wrapper's latent statistics on ``like``'s device (the host pins them to its own cuda device)."""
        return [s.to(like.device, torch.float32) for s in self.flow.wan_t2v.vae.scale]

    @torch.no_grad()
    def latent_distribution(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, F, H, W]`` in [-1, 1] -> (mean, std), each ``[B, 16, 1 + (F - 1) / 4, H / 8, W / 8]``.

        The Wan VAE's ``encode`` gives the normalised posterior mean, which the host trains on: std is zero.
        """
        self._require_text_and_vae("encode videos")
        vae = self.flow.first_stage_model
        weight = next(vae.parameters())
        scale = self._vae_scale(weight)
        with eval_mode(vae):
            mean = torch.cat([vae.encode(u.unsqueeze(0).to(weight), scale).float() for u in pixels])
        return mean, torch.zeros_like(mean)

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` in [-1, 1] -> latents ``[B, 16, 1 + (F - 1) / 4, H / 8, W / 8]``."""
        return self.latent_distribution(pixels)[0]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 16, f, h, w]`` -> pixels ``[B, C, 1 + 4 (f - 1), 8 h, 8 w]`` in [-1, 1]."""
        self._require_text_and_vae("decode latents")
        vae = self.flow.first_stage_model
        weight = next(vae.parameters())
        scale = self._vae_scale(weight)
        with eval_mode(vae):
            return torch.cat([vae.decode(z.unsqueeze(0).to(weight), scale).float().clamp(-1, 1) for z in latents])

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Captions -> umT5 embeddings ``[B, text_len, D]``: each caption's tokens, then zeros."""
        self._require_text_and_vae("encode prompts")
        encoder = self.flow.wan_t2v.text_encoder  # the host's T5EncoderModel: tokenizer + the flow's T5Encoder
        device = next(encoder.model.parameters()).device
        with eval_mode(encoder.model):  # its dropout (0.1) must not make a caption's embedding random
            embeds = encoder(list(prompts), device)  # list of [L_i, D], trimmed to each caption's tokens
        length = int(self.denoiser.text_len)
        out = torch.zeros(len(embeds), length, embeds[0].shape[-1], device=device)
        for i, u in enumerate(embeds):
            out[i, : u.shape[0]] = u[:length].float()
        return out

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``[n]`` timesteps ``1000 s``: uniform draws on the host's grid ``u = 1, 0.999, ..., 0.001`` shifted as it
        shifts; ``dpo.timestep_sampling`` logit_normal / mode draw continuous ``u`` instead."""
        schedule = self.flow_schedule
        if schedule.sampling != "uniform":
            return super().sample_timesteps(n, device)
        levels = schedule.num_train_timesteps
        u = (levels - torch.randint(0, levels, (n,), device=device)).float() / levels
        return shift_sigmas(u, schedule.shift) * levels

    def _predict_with(self, net: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``WanModel`` on lists of ``[16, f, h, w]`` latents and ``[text_len, D]`` contexts -> ``[B, 16, f, h, w]``."""
        dtype = next(net.parameters()).dtype
        out = net(x=list(noisy.to(dtype)), t=t.float(), context=list(cond.to(dtype)), seq_len=None,
                  activation_checkpointing=self.cfg.activation_checkpointing, grad_offload=self.cfg.grad_offload)
        return torch.stack(out).float()

    @torch.no_grad()
    def generate(self, prompts: list[str], num_frames: int = 81, steps: int = 50, guidance: float = 5.0,
                 seed: int | list[int] = 0, height: int | None = None, width: int | None = None,
                 negative_prompt: str = "") -> torch.Tensor:
        """``WanT2V.generate``'s sampler, one prompt at a time -> ``[B, F, C, H, W]`` in [0, 1].

        As the host: noise from a generator seeded with the prompt's seed, Wan's FlowUniPCMultistepScheduler at
        ``model.sample_shift``, classifier-free guidance against the negative prompt (the task's own when empty),
        bf16 autocast on a GPU. Unlike the host's, nothing is offloaded and there is no process-group barrier
        or rank-0-only decode, so it also runs inside a DDP step (the host's ImageLogger calls it on rank 0).
        """
        self._require_text_and_vae("generate")
        solvers = import_videotuna("videotuna.models.wan.wan.utils.fm_solvers_unipc", self.family, self.checkpoint_keys)
        t2v = self.flow.wan_t2v
        height, width = height or 480, width or 832  # Wan2.1-T2V-1.3B's size, 480*832
        stride, patch = t2v.vae_stride, t2v.patch_size
        if (num_frames - 1) % stride[0]:
            raise UserError(f"generate.num_frames={num_frames}: Wan samples 4n+1 frames (81 at 16 fps)")
        if height % (stride[1] * patch[1]) or width % (stride[2] * patch[2]):
            raise UserError(f"generate: height and width must be multiples of {stride[1] * patch[1]} for Wan, "
                            f"got {height}x{width}")
        seeds = seed_list(seed, len(prompts))
        net = self.denoiser
        device = next(net.parameters()).device
        shape = (self.flow.first_stage_model.z_dim, (num_frames - 1) // stride[0] + 1, height // stride[1],
                 width // stride[2])
        null = self.encode_prompt([negative_prompt or t2v.sample_neg_prompt])[0]
        autocast = torch.autocast("cuda", dtype=t2v.param_dtype, enabled=device.type == "cuda")
        videos = []
        with eval_mode(net):
            for prompt, s in zip(prompts, seeds):
                context = self.encode_prompt([prompt])[0]
                generator = torch.Generator(device=device).manual_seed(s)
                latent = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
                sampler = solvers.FlowUniPCMultistepScheduler(num_train_timesteps=t2v.num_train_timesteps, shift=1,
                                                              use_dynamic_shifting=False)
                sampler.set_timesteps(steps, device=device, shift=self.cfg.sample_shift)
                with autocast:
                    for t in sampler.timesteps:
                        timestep = t.reshape(1)
                        cond = net([latent], t=timestep, context=[context])[0]
                        uncond = net([latent], t=timestep, context=[null])[0]
                        velocity = uncond + guidance * (cond - uncond)
                        latent = sampler.step(velocity.unsqueeze(0), t, latent.unsqueeze(0), return_dict=False,
                                              generator=generator)[0].squeeze(0)
                videos.append(self.decode_latents(latent.unsqueeze(0).float())[0])  # [C, F, H, W] in [-1, 1]
        return ((torch.stack(videos) + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()
