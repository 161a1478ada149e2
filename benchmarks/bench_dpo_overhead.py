"""What DPO costs over SFT: ``excess = (t_dpo - t_sft) / t_ref`` on a CogVideoX whose transformer dominates.

t_sft: one SFT step on both videos of a pair (policy forward on 2B samples, MSE, backward, AdamW step);
t_ref: one no-grad reference forward on both; t_dpo: one DPO step (``DPOModule.dpo_step`` + backward +
AdamW step). The floor is 1.0 (DPO = SFT + one reference forward); the target is <= 1.15. LoRA
(reference = the same network with adapters off) and full fine-tune (reference = a frozen copy).
Latents and text embeddings enter as a latent-cache batch, so the VAE and T5 take no part.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_dpo_overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from videotuna_dpo.losses import per_sample_mse
from videotuna_dpo.models.cogvideox import CogVideoXBackend
from videotuna_dpo.models.tiny import build_tiny_cogvideox
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

LAYERS, HEADS, HEAD_DIM = 8, 8, 64  # the shape the issue measured from outside (excess 1.28-1.52)


def build_model(root: Path, latent_side: int, frames: int) -> Path:
    """The tiny CogVideoX pipeline with its transformer replaced by an 8-layer, 8 x 64-head one."""
    from diffusers import CogVideoXTransformer3DModel

    build_tiny_cogvideox(root)
    torch.manual_seed(0)
    CogVideoXTransformer3DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=128,
        text_embed_dim=32, num_layers=LAYERS, sample_width=latent_side, sample_height=latent_side,
        sample_frames=frames, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16,
    ).save_pretrained(root / "transformer", safe_serialization=True)
    return root


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(root: Path, finetune: str, batch: dict, repeats: int) -> dict:
    model = {"name": "cogvideox", "pretrained": str(root), "weight_dtype": "fp32", "finetune": finetune,
             "lora": {"rank": 32, "alpha": 32}}
    backend = CogVideoXBackend.from_config(OmegaConf.create(model))
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=5000.0)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    optimizer = module.configure_optimizers()["optimizer"]
    x0 = torch.cat([batch["winner_latents"], batch["loser_latents"]])
    cond = torch.cat([batch["prompt_embeds"]] * 2)
    noise = torch.randn_like(x0)
    t = torch.full((x0.shape[0],), 500, dtype=torch.long)
    noisy, target = backend.add_noise(x0, noise, t), backend.target(x0, noise, t)

    def sft() -> None:
        loss = per_sample_mse(backend.predict(noisy, t, cond), target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def ref() -> None:
        with torch.no_grad(), backend.reference() as reference:
            reference(noisy, t, cond)

    def dpo() -> None:
        out, _ = module.dpo_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()

    t_sft, t_ref, t_dpo = timed(sft, repeats), timed(ref, repeats), timed(dpo, repeats)
    return {"t_sft_s": round(t_sft, 4), "t_ref_s": round(t_ref, 4), "t_dpo_s": round(t_dpo, 4),
            "excess": round((t_dpo - t_sft) / t_ref, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--latent-side", type=int, default=16, help="latent height = width (pixels / 8)")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per batch")
    args = parser.parse_args()
    torch.set_num_threads(2)
    frames = 9  # 3 latent frames
    with tempfile.TemporaryDirectory() as tmp:
        root = build_model(Path(tmp) / "model", args.latent_side, frames)
        g = torch.Generator().manual_seed(0)
        shape = (args.pairs, 3, 4, args.latent_side, args.latent_side)  # [B, F, C, H, W] latents
        batch = {"winner_latents": torch.randn(shape, generator=g), "loser_latents": torch.randn(shape, generator=g),
                 "prompt_embeds": torch.randn(args.pairs, 16, 32, generator=g), "caption": ["a"] * args.pairs}
        results = {finetune: measure(root, finetune, batch, args.repeats) for finetune in ("lora", "full")}
    print(json.dumps({
        "benchmark": "dpo_overhead",
        "model": f"CogVideoX transformer, {LAYERS} layers x {HEADS} heads x {HEAD_DIM}, random weights",
        "latents": [args.pairs, 3, 4, args.latent_side, args.latent_side],
        "threads": torch.get_num_threads(), "floor": 1.0, "target": 1.15,
        **results,
    }, indent=2))


if __name__ == "__main__":
    main()
