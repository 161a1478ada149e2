"""Training steps/second with and without the latent cache on the tiny CogVideoX; bytes per video.

Prints one JSON object. Target: the cached path at least 2x faster.
Run: .venv/bin/python benchmarks/bench_cache.py [--steps 20] [--resolution 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from videotuna_dpo.data.datamodule import PreferenceDataModule
from videotuna_dpo.data.latent_cache import build_cache
from videotuna_dpo.data.preference import write_official_layout
from videotuna_dpo.data.video_io import write_video
from videotuna_dpo.models.cogvideox import CogVideoXBackend
from videotuna_dpo.models.tiny import build_tiny_cogvideox
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema
from videotuna_dpo.toy.world import FLAWS, all_specs, render


def steps_per_second(module: DPOModule, loader, steps: int) -> float:
    optimizer = module.configure_optimizers()["optimizer"]
    batches = iter(loader)
    done, start = 0, None
    while done < steps + 2:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        if done == 2:  # two warm-up steps
            start = time.perf_counter()
        out, _ = module.dpo_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        done += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=32, help="pixels; the tiny model's native size is 32")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    size = args.resolution
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_cogvideox(tmp / "model")
        clips, pairs = [], []
        for i, spec in enumerate(all_specs()[:8]):
            for k, flaw in enumerate((None, FLAWS[i % len(FLAWS)])):
                name = f"videos/{i}_{k}.mp4"
                write_video(tmp / "ds" / "pairs" / name, render(spec, 9, size, flaw=flaw, seed=i))
                clips.append({"clip_path": name, "caption": spec.caption})
            pairs.append({"winner": 2 * i, "loser": 2 * i + 1, "caption": spec.caption, "score": 0.5})
        write_official_layout(tmp / "ds" / "pairs", clips, pairs)
        model_cfg = OmegaConf.create({"name": "cogvideox", "pretrained": str(model_dir), "weight_dtype": "fp32",
                                      "lora": {"rank": 8, "alpha": 8}})
        data = {"train_data": str(tmp / "ds" / "train_data.yaml"), "video_length": 9, "resolution": [size, size],
                "batch_size": 2, "frame_start": "first"}
        dpo = OmegaConf.structured(DPOSchema(beta=500.0))
        optim = OmegaConf.structured(OptimizerSchema(lr=1e-4))

        backend = CogVideoXBackend.from_config(model_cfg)
        dm = PreferenceDataModule.from_config(OmegaConf.create(data))
        uncached = steps_per_second(DPOModule(backend, dpo, optim), dm.train_dataloader(), args.steps)

        start = time.perf_counter()
        summary = build_cache(model_cfg, dm.cfg, backend, tmp / "ds", tmp / "cache")
        cache_seconds = time.perf_counter() - start
        lean = CogVideoXBackend.from_config(OmegaConf.merge(model_cfg, {"load_text_and_vae": False}))
        dm_cached = PreferenceDataModule.from_config(OmegaConf.create({**data, "cache": str(tmp / "cache")}))
        cached = steps_per_second(DPOModule(lean, dpo, optim), dm_cached.train_dataloader(), args.steps)

    print(json.dumps({
        "benchmark": "latent_cache",
        "model": "tiny CogVideoX (random weights, real architecture)",
        "video": f"9 frames x {size}x{size}",
        "batch_pairs": 2,
        "steps_per_second_uncached": round(uncached, 2),
        "steps_per_second_cached": round(cached, 2),
        "speedup": round(cached / uncached, 2),
        "target_speedup": 2.0,
        "meets_target": cached / uncached >= 2.0,
        "cache_bytes_per_video": round(summary["bytes"] / summary["videos"]),
        "cache_build_seconds": round(cache_seconds, 2),
        "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
