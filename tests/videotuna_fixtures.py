"""Tiny VC2 / T2V-Turbo inputs for the VideoTuna-backed tests: the stand-in on sys.path, flow configs, checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

STANDIN = Path(__file__).resolve().parent / "videotuna_standin"


def use_standin() -> None:
    """Make the stand-in ``videotuna`` (and the tiny text encoder) importable."""
    if str(STANDIN) not in sys.path:
        sys.path.insert(0, str(STANDIN))


def tiny_flow_section(use_scale: bool = True, parameterization: str = "eps") -> dict:
    """VideoTuna's vc2_t2v_320x512 flow section, shrunk: 32x32 frames -> latents [4, F, 4, 4]."""
    return {
        "target": "videotuna.flow.videocrafter.VideocrafterFlow",
        "params": {
            "first_stage_key": "video", "cond_stage_key": "caption", "conditioning_key": "crossattn",
            "image_size": [4, 4], "channels": 4, "scale_by_std": False, "scale_factor": 0.18215,
            "use_ema": False, "uncond_type": "empty_seq", "encoder_type": "2d", "use_scale": use_scale,
            "scale_b": 0.7, "parameterization": parameterization,
            "scheduler_config": {"target": "videotuna.schedulers.ddpm.LDDPM",
                                 "params": {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}},
            "denoiser_config": {
                "target": "videotuna.models.lvdm.modules.networks.openaimodel3d.UNetModel",
                "params": {"in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
                           "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16, "context_dim": 32,
                           "use_linear": True, "temporal_conv": True, "temporal_attention": True,
                           "temporal_selfatt_only": True, "use_relative_position": False, "temporal_length": 4,
                           "addition_attention": True, "fps_cond": True},
            },
            "first_stage_config": {
                "target": "videotuna.models.lvdm.modules.vae.autoencoder.AutoencoderKL",
                "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                           "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3,
                                        "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                                        "attn_resolutions": [], "dropout": 0.0},
                           "lossconfig": {"target": "torch.nn.Identity"}},
            },
            "cond_stage_config": {"target": "tiny_text.TinyTextEncoder", "params": {"dim": 32}},
        },
    }


def build_host_flow(section: dict):
    from omegaconf import OmegaConf
    from videotuna.utils.common_utils import instantiate_from_config

    return instantiate_from_config(OmegaConf.create(section))


def write_vc2_ckpt(path: Path, section: dict, seed: int = 0) -> Path:
    """A VideoCrafter2-layout ``model.ckpt`` (``{'state_dict': ...}`` with VC2's key prefixes)."""
    torch.manual_seed(seed)
    flow = build_host_flow(section)
    state = {}
    for prefix, module in (("model.diffusion_model.", flow.denoiser), ("first_stage_model.", flow.first_stage_model),
                           ("cond_stage_model.", flow.cond_stage_model)):
        state.update({prefix + k: v.clone() for k, v in module.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path


def write_turbo_lora(path: Path, section: dict, rank: int = 4, time_cond_proj_dim: int = 256, seed: int = 1) -> Path:
    """A T2V-Turbo ``unet_lora.pt``: [up, down] per Linear/Conv of the UNet (time_cond_proj included), nonzero."""
    from videotuna_dpo.models.t2v_turbo import lora_targets

    flow = build_host_flow(section)
    targets = lora_targets(flow.denoiser)
    width = flow.denoiser.time_embed[0].in_features
    at = max(i for i, (n, _) in enumerate(targets) if n.startswith(("fps_embedding", "time_embed"))) + 1
    targets.insert(at, ("time_cond_proj", nn.Linear(time_cond_proj_dim, width, bias=False)))
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _, m in targets:
        if isinstance(m, nn.Linear):
            r = min(rank, m.in_features, m.out_features)
            up, down = (m.out_features, r), (r, m.in_features)
        else:
            r = min(rank, m.in_channels, m.out_channels)
            up, down = (m.out_channels, r) + (1,) * len(m.kernel_size), (r, m.in_channels) + tuple(m.kernel_size)
        tensors += [torch.randn(up, generator=g) * 0.02, torch.randn(down, generator=g) / r]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path)
    return path


@pytest.fixture(scope="session")
def vc2_files(tmp_path_factory):
    """The tiny flow section, a VC2 model.ckpt and a T2V-Turbo unet_lora.pt (rank 4) for it."""
    use_standin()
    root = tmp_path_factory.mktemp("vc2")
    section = tiny_flow_section()
    return {"section": section, "ckpt": write_vc2_ckpt(root / "model.ckpt", section),
            "lora": write_turbo_lora(root / "unet_lora.pt", section, rank=4)}


@pytest.fixture(scope="session")
def pair_batch(tiny_dataset):
    """Two (winner, loser, caption) pairs: pixels [2, 3, 4, 32, 32] in [-1, 1]."""
    from omegaconf import OmegaConf

    from videotuna_dpo.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule.from_config(OmegaConf.create(
        {"train_data": str(tiny_dataset), "video_length": 4, "resolution": [32, 32], "batch_size": 2,
         "shuffle": False, "frame_start": "first"}))
    return next(iter(dm.train_dataloader()))


def make_vc2(files, **overrides):
    from omegaconf import OmegaConf

    from videotuna_dpo.models.videocrafter import VideoCrafter2Backend

    torch.manual_seed(0)
    cfg = {"name": "videocrafter2", "flow": files["section"], "ckpt": str(files["ckpt"]), **overrides}
    return VideoCrafter2Backend.from_config(OmegaConf.create(cfg))


def make_turbo(files, **overrides):
    from omegaconf import OmegaConf

    from videotuna_dpo.models.t2v_turbo import T2VTurboBackend

    torch.manual_seed(0)
    cfg = {"name": "t2v_turbo", "flow": files["section"], "ckpt": str(files["ckpt"]),
           "lora_ckpt": str(files["lora"]), "lora_rank": 4, **overrides}
    return T2VTurboBackend.from_config(OmegaConf.create(cfg))


def dpo_module(backend, beta=500.0, lr=1e-3, **dpo):
    from omegaconf import OmegaConf

    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    return DPOModule(backend, OmegaConf.structured(DPOSchema(beta=beta, **dpo)),
                     OmegaConf.structured(OptimizerSchema(lr=lr, weight_decay=0.0)))


def train_steps(module, batch, steps, seed=None):
    """Plain optimizer steps on ``batch``; with ``seed`` every step draws the same noise and timesteps."""
    optimizer = module.configure_optimizers()["optimizer"]
    out = None
    for _ in range(steps):
        if seed is not None:
            torch.manual_seed(seed)
        out, _ = module.dpo_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return out


# -- Wan2.1 through VideoTuna's WanVideoModelFlow ------------------------------------------------------------------

def tiny_wan_section(ckpt: Path | str, task: str = "t2v-1.3B") -> dict:
    """The flow section of configs/videotuna/wan_dpo.yaml, shrunk: 5 frames of 32x32 -> latents [16, 2, 4, 4],
    prompts -> [64, 4096]."""
    from videotuna_dpo.models.tiny import tiny_t5_tokenizer

    return {
        "target": "videotuna.flow.wanvideo.WanVideoModelFlow",
        "params": {
            "task": task, "ckpt_path": str(ckpt), "offload_model": False, "ulysses_size": 1, "ring_size": 1,
            "t5_fsdp": False, "t5_cpu": False, "dit_fsdp": False, "use_prompt_extend": False, "seed": 42,
            "denoiser_config": {"target": "videotuna.models.wan.wan.modules.model.WanModel",
                                "use_from_pretrained": True, "params": {"pretrained_model_name_or_path": str(ckpt)}},
            "first_stage_config": {"target": "videotuna.models.wan.wan.modules.vae.WanVAE_",
                                   "params": {"dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
                                              "attn_scales": [], "temperal_downsample": [False, True, True],
                                              "dropout": 0.0}},
            "cond_stage_config": {"target": "videotuna.models.wan.wan.modules.t5.T5Encoder",
                                  "params": {"dim": 4096, "dim_attn": 16, "dim_ffn": 16, "num_heads": 2,
                                             "num_buckets": 8, "shared_pos": False, "dropout": 0.1,
                                             "vocab": len(tiny_t5_tokenizer()), "num_layers": 1}},
        },
    }


def write_wan_ckpt(folder: Path, section: dict, seed: int = 0) -> Path:
    """A Wan2.1 checkpoint folder as the flow loads it: WanModel's save_pretrained (config.json + safetensors),
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth and the tokenizer in google/umt5-xxl/."""
    from videotuna.models.wan.wan.modules.model import WanModel
    from videotuna.models.wan.wan.modules.t5 import T5Encoder
    from videotuna.models.wan.wan.modules.vae import WanVAE_

    from videotuna_dpo.models.tiny import tiny_t5_tokenizer

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    params = section["params"]
    # text_dim is not in WanModel's saved config (ignore_for_config): it loads as umT5-xxl's 4096, so the tiny T5
    # has dim 4096 too; text_len 64 keeps the cached prompt embeddings small.
    model = WanModel(dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=2, text_len=64)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # a trained head: the fresh one predicts zeros
    model.save_pretrained(folder, safe_serialization=True)
    torch.save(WanVAE_(**params["first_stage_config"]["params"]).state_dict(), folder / "Wan2.1_VAE.pth")
    t5 = T5Encoder(**params["cond_stage_config"]["params"]).to(torch.bfloat16)
    torch.save(t5.state_dict(), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    tiny_t5_tokenizer().save_pretrained(folder / "google" / "umt5-xxl")
    return folder


@pytest.fixture(scope="session")
def wan_files(tmp_path_factory):
    """The tiny WanVideoModelFlow section and its checkpoint folder."""
    use_standin()
    folder = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny"
    section = tiny_wan_section(folder)
    return {"section": section, "ckpt": write_wan_ckpt(folder, section)}


@pytest.fixture(scope="session")
def wan_pair_batch(tiny_dataset):
    """Two (winner, loser, caption) pairs of 4n+1 frames, as Wan trains: pixels [2, 3, 5, 32, 32] in [-1, 1]."""
    from omegaconf import OmegaConf

    from videotuna_dpo.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule.from_config(OmegaConf.create(
        {"train_data": str(tiny_dataset), "video_length": 5, "resolution": [32, 32], "batch_size": 2,
         "shuffle": False, "frame_start": "first"}))
    return next(iter(dm.train_dataloader()))


def make_wan(files, **overrides):
    from omegaconf import OmegaConf

    from videotuna_dpo.models.wan_videotuna import WanVideoTunaBackend

    torch.manual_seed(0)
    cfg = {"name": "wan_videotuna", "flow": files["section"], "ckpt": str(files["ckpt"]),
           "lora": {"rank": 4, "alpha": 4}, **overrides}
    return WanVideoTunaBackend.from_config(OmegaConf.create(cfg))
