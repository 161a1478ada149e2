"""The same pairs trained the official VideoDPO way and ours: time per step and peak memory, both as ratios.

Official (VideoDPO's training code): a full fine-tune with a second full copy of the model as the reference,
both videos VAE-encoded and both captions text-encoded from pixels every step, and independent noise and
timesteps for winner and loser (``dpo.share_noise=false``). Ours: a latent-cache batch (no VAE, no T5 in
memory) with shared noise, and either LoRA with the adapters-off reference (no copy) or a full fine-tune with
the reference's errors precomputed (``dpo.precompute_reference``: no copy, no reference forward).

The model is ``bench_dpo_overhead``'s 8-layer CogVideoX (tiny VAE and T5 of the same architectures); the
official path encodes 9 frames of pixels to the same latents ``[3, 4, 16, 16]`` the cache holds. Each
configuration's memory is measured in its own process, as ``bench_reference_memory`` measures it (peak resident
memory over the post-import baseline, after a warm-up step); time in one process holding all three, stepped in
turn round after round, as the median of each one's steps.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_official_baseline.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

CONFIGS = ("official", "ours_lora", "ours_full_precomputed_reference")


def build(config: str, root: Path, latent_side: int):
    """The module, its optimizer and a batch of one configuration."""
    import torch
    from contextlib import nullcontext

    from omegaconf import OmegaConf

    from bench_dpo_overhead import latent_batch, model_config, store_reference_errors
    from videotuna_dpo.models.cogvideox import CogVideoXBackend
    from videotuna_dpo.models.finetune import without_reference_copy
    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    official, precompute = config == "official", config == "ours_full_precomputed_reference"
    model = model_config(root, "lora" if config == "ours_lora" else "full", load_text_and_vae=official)
    with without_reference_copy() if precompute else nullcontext():
        backend = CogVideoXBackend.from_config(OmegaConf.create(model))
    dpo = DPOSchema(beta=5000.0, share_noise=not official, precompute_reference=precompute)
    module = DPOModule(backend, OmegaConf.structured(dpo), OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    optimizer = module.configure_optimizers()["optimizer"]
    latents = latent_batch(1, latent_side)
    if official:  # pixels [B, C, F, H, W] in [-1, 1] that the VAE encodes to the cache's latent shape
        side = latent_side * backend.vae_scale_factor_spatial
        g = torch.Generator().manual_seed(1)
        batch = {"winner": torch.rand(1, 3, 9, side, side, generator=g) * 2 - 1,
                 "loser": torch.rand(1, 3, 9, side, side, generator=g) * 2 - 1, "caption": ["a red square moving right"]}
        with torch.no_grad():
            encoded = backend.encode_video(batch["winner"])
        if encoded.shape != latents["winner_latents"].shape:
            raise RuntimeError(f"pixels encode to {tuple(encoded.shape)}, the cache's latents are "
                               f"{tuple(latents['winner_latents'].shape)}")
    else:
        batch = latents
    if precompute:  # what the pre-pass stores, in the batch
        store_reference_errors(module, backend, batch)

    def step() -> float:
        start = time.perf_counter()
        loss = module.dpo_step(batch)[0].loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return backend, step


def memory(config: str, root: Path, latent_side: int, steps: int, threads: int) -> dict:
    """Peak memory of one configuration, alone in this process."""
    import torch

    torch.set_num_threads(threads)
    from bench_reference_memory import import_model_code, peak_bytes, reset_peak, rss_bytes

    import_model_code()
    baseline = rss_bytes()
    backend, step = build(config, root, latent_side)
    step()  # warm-up
    reset = reset_peak()
    for _ in range(steps):
        step()
    return {"peak_mb": round((peak_bytes() - baseline) / 2**20, 1), "peak_reset_after_build": reset,
            "parameters_in_process": sum(p.numel() for p in backend.parameters()),
            "trainable_parameters": sum(p.numel() for p in backend.trainable_parameters())}


def timing(root: Path, latent_side: int, steps: int, threads: int) -> dict:
    """Median seconds per step of every configuration, built side by side and stepped in turn, round by round
    (drift in the machine's load hits all alike)."""
    import torch

    torch.set_num_threads(threads)
    steppers = {name: build(name, root, latent_side)[1] for name in CONFIGS}
    times = {name: [] for name in CONFIGS}
    for round_ in range(steps + 1):  # one warm-up round
        for name, step in steppers.items():
            seconds = step()
            if round_:
                times[name].append(seconds)
    return {name: round(statistics.median(ts), 4) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3, help="timed rounds, after one warm-up round")
    parser.add_argument("--memory-steps", type=int, default=1, help="steps in the memory window, after a warm-up step")
    parser.add_argument("--latent-side", type=int, default=16, help="latent height = width")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", choices=CONFIGS, help="(internal) one configuration's memory, in this process")
    parser.add_argument("--time", action="store_true", help="(internal) every configuration's time, in this process")
    parser.add_argument("--model", type=Path, help="(internal) the model directory")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(memory(args.measure, args.model, args.latent_side, args.memory_steps, args.threads)))
        return
    if args.time:
        print(json.dumps(timing(args.model, args.latent_side, args.steps, args.threads)))
        return
    from bench_dpo_overhead import HEAD_DIM, HEADS, LAYERS, build_model
    from bench_reference_memory import MEASURE, run_child

    with tempfile.TemporaryDirectory() as tmp:
        root = build_model(Path(tmp) / "model", args.latent_side)
        common = ["--model", str(root), "--latent-side", str(args.latent_side), "--threads", str(args.threads)]
        runs = {name: run_child(["bench_official_baseline.py", "--measure", name, "--memory-steps",
                                 str(args.memory_steps), *common]) for name in CONFIGS}
        seconds = run_child(["bench_official_baseline.py", "--time", "--steps", str(args.steps), *common])
    for name in CONFIGS:
        runs[name]["s_per_step"] = seconds[name]
    official = runs["official"]
    print(json.dumps({
        "benchmark": "official_style_baseline",
        "model": f"CogVideoX transformer, {LAYERS} layers x {HEADS} heads x {HEAD_DIM}, fp32, random weights; "
                 f"tiny CogVideoX VAE and T5",
        "latents": [1, 3, 4, args.latent_side, args.latent_side], "timed_rounds": args.steps, "threads": args.threads,
        "official": "full fine-tune, frozen reference copy, VAE + T5 encoding both videos from pixels each step, "
                    "independent noise and timesteps (dpo.share_noise=false)",
        "ours_lora": "LoRA rank 32, adapters-off reference, latent-cache batch, shared noise",
        "ours_full_precomputed_reference": "full fine-tune, dpo.precompute_reference (no copy), latent-cache batch, "
                                           "shared noise",
        "memory_measure": MEASURE,
        "ratios": {name: {"time_official_over_ours": round(official["s_per_step"] / runs[name]["s_per_step"], 2),
                          "memory_official_over_ours": round(official["peak_mb"] / runs[name]["peak_mb"], 2)}
                   for name in CONFIGS[1:]},
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
