"""Train the toy world's base model: ``python -m videotuna_dpo.toy.train_base [--out DIR]``.

The base model learns from a mix of clean and flawed videos (flicker, jitter, wrong colour, no
motion), so its samples are a mix too: the preference signal DPO then learns from. The shipped
checkpoint (videotuna_dpo/toy/base) is this script's output with its defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from videotuna_dpo.toy.backend import BUILTIN, save_toy_checkpoint, toy_scheduler
from videotuna_dpo.toy.model import ToyTextEncoder, ToyVideoUNet, tokenize
from videotuna_dpo.toy.world import FLAWS, all_specs, render

FRAMES, SIZE = 8, 32


def training_batch(batch_size: int, clean_fraction: float, rng: random.Random, caption_dropout: float):
    """Videos ``[B, 3, F, H, W]`` in [-1, 1] and their captions ("" when dropped, for guidance)."""
    specs = all_specs()
    videos, captions = [], []
    for _ in range(batch_size):
        spec = rng.choice(specs)
        flaw = None if rng.random() < clean_fraction else rng.choice(FLAWS)
        video = render(spec, FRAMES, SIZE, flaw=flaw, seed=rng.randrange(1 << 30))
        videos.append(video.permute(1, 0, 2, 3).float() / 127.5 - 1)
        captions.append("" if rng.random() < caption_dropout else spec.caption)
    return torch.stack(videos), captions


def train(out: Path, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3, clean_fraction: float = 0.5,
          caption_dropout: float = 0.1, seed: int = 0, ema_decay: float = 0.999) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    unet, text_encoder, scheduler = ToyVideoUNet(), ToyTextEncoder(), toy_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # An exponential moving average of the weights samples far cleaner than the last iterate.
    ema_unet = EMAModel(unet.parameters(), decay=ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=ema_decay)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, losses = time.time(), []
    bar = tqdm(range(steps), desc="toy base", unit="step")
    for step in bar:
        x0, captions = training_batch(batch_size, clean_fraction, rng, caption_dropout)
        ids = tokenize(captions)
        text = text_encoder(ids)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,))
        pred = unet(scheduler.add_noise(x0, noise, t), t, text, ids != 0)
        loss = (pred - scheduler.get_velocity(x0, noise, t)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    save_toy_checkpoint(out, unet, text_encoder, scheduler)
    info = {"steps": steps, "batch_size": batch_size, "lr": lr, "clean_fraction": clean_fraction,
            "caption_dropout": caption_dropout, "seed": seed, "ema_decay": ema_decay, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seconds": round(time.time() - start, 1), "frames": FRAMES, "size": SIZE}
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUILTIN, help=f"checkpoint directory (default: {BUILTIN})")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clean-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = train(args.out, args.steps, args.batch_size, args.lr, args.clean_fraction, seed=args.seed)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
