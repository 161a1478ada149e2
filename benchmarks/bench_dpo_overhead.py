"""What DPO costs over SFT: ``excess = (t_dpo - t_sft) / t_ref`` on a CogVideoX whose transformer dominates.

t_sft: one SFT step on both videos of a pair (policy forward on 2B samples, MSE, backward, AdamW step);
t_ref: one no-grad reference forward on both; t_dpo: one DPO step (``DPOModule.dpo_step`` + backward +
AdamW step). The floor is 1.0 (DPO = SFT + one reference forward); the target is <= 1.15. LoRA
(reference = the same network with adapters off) and full fine-tune (reference = a frozen copy).
Latents and text embeddings enter as a latent-cache batch, so the VAE and T5 take no part.

Next to the timed figures, two that do not depend on the machine: the denoiser and block forwards each
step runs (counted by a forward hook on every CogVideoX transformer and block in the process) and the
FLOP excess ``(flops_dpo - flops_sft) / flops_ref`` (torch's FlopCounterMode over one step: matrix products
and convolutions, attention in its math form so its products are counted; elementwise ops are not). Each step's AdamW update is timed apart from its forward and
backward, so the timed excess is given with and without it (the update is the same work in both steps,
but it evicts caches and, in a full fine-tune, is a large share of the step). The three steps run
interleaved, round after round, so drift in the machine's load hits all three alike.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_dpo_overhead.py [--repeats 5]
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
FRAMES = 9  # pixels; 3 latent frames


def build_model(root: Path, latent_side: int, frames: int = FRAMES) -> Path:
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


def latent_batch(pairs: int, latent_side: int, seed: int = 0) -> dict:
    """A latent-cache batch for the model of :func:`build_model`: latents ``[B, F', C', H', W']``, embeds ``[B, 16, 32]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (pairs, 3, 4, latent_side, latent_side)
    return {"winner_latents": torch.randn(shape, generator=g), "loser_latents": torch.randn(shape, generator=g),
            "prompt_embeds": torch.randn(pairs, 16, 32, generator=g), "caption": ["a"] * pairs}


def model_config(root: Path, finetune: str, **extra) -> dict:
    return {"name": "cogvideox", "pretrained": str(root), "weight_dtype": "fp32", "finetune": finetune,
            "lora": {"rank": 32, "alpha": 32}, "load_text_and_vae": False, **extra}


class ForwardCounter:
    """Forward calls of every CogVideoX transformer and transformer block in the process, while inside."""

    def __enter__(self) -> "ForwardCounter":
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

        self.denoiser = self.blocks = 0

        def hook(module, args, output):
            self.denoiser += isinstance(module, CogVideoXTransformer3DModel)
            self.blocks += isinstance(module, CogVideoXBlock)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def counted(fn) -> dict:
    """Forwards and FLOPs of one call of ``fn`` (attention in its math form, so FlopCounterMode sees its matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with ForwardCounter() as calls, FlopCounterMode(display=False) as flops, sdpa_kernel(SDPBackend.MATH):
        fn()
    return {"denoiser_forwards": calls.denoiser, "block_forwards": calls.blocks, "flops": flops.get_total_flops()}


def measure(root: Path, finetune: str, batch: dict, repeats: int) -> dict:
    backend = CogVideoXBackend.from_config(OmegaConf.create(model_config(root, finetune)))
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=5000.0)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    optimizer = module.configure_optimizers()["optimizer"]
    x0 = torch.cat([batch["winner_latents"], batch["loser_latents"]])
    cond = torch.cat([batch["prompt_embeds"]] * 2)
    noise = torch.randn_like(x0)
    t = torch.full((x0.shape[0],), 500, dtype=torch.long)
    noisy, target = backend.add_noise(x0, noise, t), backend.target(x0, noise, t)

    def sft_loss() -> torch.Tensor:
        return per_sample_mse(backend.predict(noisy, t, cond), target).mean()

    def dpo_loss() -> torch.Tensor:
        return module.dpo_step(batch)[0].loss

    def step(loss_fn) -> tuple[float, float]:
        """Seconds of forward + backward, and of the AdamW update."""
        start = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        return middle - start, time.perf_counter() - middle

    def ref() -> float:
        start = time.perf_counter()
        with torch.no_grad(), backend.reference() as reference:
            reference(noisy, t, cond)
        return time.perf_counter() - start

    times = {"sft": [], "ref": [], "dpo": []}
    for round_ in range(repeats + 2):  # two warm-up rounds
        sample = {"sft": step(sft_loss), "ref": ref(), "dpo": step(dpo_loss)}
        if round_ >= 2:
            for name, value in sample.items():
                times[name].append(value)
    med = statistics.median
    t_sft_fb, t_sft_opt = med(f for f, _ in times["sft"]), med(o for _, o in times["sft"])
    t_dpo_fb, t_dpo_opt = med(f for f, _ in times["dpo"]), med(o for _, o in times["dpo"])
    t_sft, t_dpo = med(f + o for f, o in times["sft"]), med(f + o for f, o in times["dpo"])
    t_ref = med(times["ref"])

    def ref_forward() -> None:
        with torch.no_grad(), backend.reference() as reference:
            reference(noisy, t, cond)

    def whole(loss_fn):
        def run() -> None:
            loss = loss_fn()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return run

    count = {"sft": counted(whole(sft_loss)), "ref": counted(ref_forward), "dpo": counted(whole(dpo_loss))}
    return {
        "t_sft_s": round(t_sft, 4), "t_ref_s": round(t_ref, 4), "t_dpo_s": round(t_dpo, 4),
        "excess": round((t_dpo - t_sft) / t_ref, 3),
        "t_sft_forward_backward_s": round(t_sft_fb, 4), "t_dpo_forward_backward_s": round(t_dpo_fb, 4),
        "t_optimizer_step_s": {"sft": round(t_sft_opt, 4), "dpo": round(t_dpo_opt, 4)},
        "optimizer_share_of_sft_step": round(t_sft_opt / t_sft, 3),
        "excess_without_optimizer_step": round((t_dpo_fb - t_sft_fb) / t_ref, 3),
        "forwards_per_step": {name: {k: v for k, v in c.items() if k != "flops"} for name, c in count.items()},
        "gflops": {name: round(c["flops"] / 1e9, 3) for name, c in count.items()},
        "flop_excess": round((count["dpo"]["flops"] - count["sft"]["flops"]) / count["ref"]["flops"], 6),
        "trainable_parameters": sum(p.numel() for p in backend.trainable_parameters()),
    }


def store_reference_errors(module, backend, batch: dict) -> None:
    """Put into ``batch`` what the ``dpo.precompute_reference`` pre-pass stores: the policy before its first step
    (= the reference) on a seeded draw, as ``ref_err_w`` / ``ref_err_l``."""
    from videotuna_dpo.losses import per_sample_mse

    batch.update(draw_seed=torch.tensor([7]), draw_t=torch.tensor([[500, 500]]))
    with torch.no_grad():
        x0, noise, t, cond2 = module.step_inputs(batch)
        ref_err = per_sample_mse(backend.predict(backend.add_noise(x0, noise, t), t, cond2), backend.target(x0, noise, t))
    batch["ref_err_w"], batch["ref_err_l"] = ref_err.chunk(2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent-side", type=int, default=16, help="latent height = width (pixels / 8)")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per batch")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_model(Path(tmp) / "model", args.latent_side)
        batch = latent_batch(args.pairs, args.latent_side)
        results = {finetune: measure(root, finetune, batch, args.repeats) for finetune in ("lora", "full")}
    print(json.dumps({
        "benchmark": "dpo_overhead",
        "model": f"CogVideoX transformer, {LAYERS} layers x {HEADS} heads x {HEAD_DIM}, random weights",
        "latents": [args.pairs, 3, 4, args.latent_side, args.latent_side],
        "threads": torch.get_num_threads(), "floor": 1.0, "target": 1.15, "repeats": args.repeats,
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode over one whole step (forward, backward, "
                            "AdamW update), attention in its math form; it counts matrix products and "
                            "convolutions, not elementwise ops; deterministic",
        **results,
    }, indent=2))


if __name__ == "__main__":
    main()
