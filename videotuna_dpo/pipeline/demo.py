"""``videotuna demo``: DPO end to end on a tiny CogVideoX, offline, on a CPU, in about a minute."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from videotuna_dpo.data.preference import write_official_layout
from videotuna_dpo.data.video_io import write_video
from videotuna_dpo.toy.world import FLAWS, all_specs, render


def build_demo_dataset(root: Path, n_prompts: int = 8, frames: int = 9, size: int = 32) -> Path:
    """Clean renders (winners) against flawed ones (losers), in the official layout."""
    clips, pairs = [], []
    for i, spec in enumerate(all_specs()[:n_prompts]):
        flaw = FLAWS[i % len(FLAWS)]
        for kind, f in (("clean", None), (flaw, flaw)):
            name = f"videos/{i:03d}_{kind}.mp4"
            write_video(root / "pairs" / name, render(spec, frames, size, flaw=f, seed=i), lossless=True)
            clips.append({"clip_path": name, "caption": spec.caption, "duration": frames / 8})
        pairs.append({"winner": 2 * i, "loser": 2 * i + 1, "caption": spec.caption, "score": 0.5})
    return write_official_layout(root / "pairs", clips, pairs)


def run_demo(out: Path, steps: int = 30) -> dict:
    """Build the tiny model and data, DPO-train through the `dpo` strategy, sample with the result."""
    from videotuna_dpo.models.tiny import build_tiny_cogvideox
    from videotuna_dpo.registry import Registry

    start = time.time()
    out = Path(out)
    model_dir = out / "CogVideoX-tiny"
    if not (model_dir / "model_index.json").is_file():
        build_tiny_cogvideox(model_dir)
    train_data = build_demo_dataset(out / "data")
    cfg = OmegaConf.create({
        "plugins": ["dpo"], "seed": 0, "output_dir": str(out / "run"),
        "model": {"name": "cogvideox", "pretrained": str(model_dir), "finetune": "lora",
                  "lora": {"rank": 8, "alpha": 8}, "weight_dtype": "fp32"},
        "data": {"name": "preference", "train_data": str(train_data), "video_length": 9, "resolution": [32, 32],
                 "batch_size": 4},
        "dpo": {"beta": 500.0},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0},
        "lightning": {"trainer": {"max_steps": steps, "accelerator": "cpu", "devices": 1, "log_every_n_steps": 1,
                                  "enable_model_summary": False},
                      "checkpoint": {"every_n_train_steps": steps}},
    })
    registry = Registry.load(cfg.plugins)
    run_dir = registry.get("strategy", "dpo").run(cfg, registry, source="videotuna demo")
    backend = registry.get("model", "cogvideox").from_config(
        OmegaConf.merge(cfg.model, {"trainable_weights": str(run_dir / "weights" / "last")}))
    prompts = [s.caption for s in all_specs()[:2]]
    videos = backend.generate(prompts, num_frames=9, steps=4, guidance=2.0, seed=0)
    for i, video in enumerate(videos):
        write_video(out / "samples" / f"tuned_{i}.mp4", video)
    return {"run": str(run_dir), "samples": str(out / "samples"), "seconds": round(time.time() - start, 1)}
