"""Train the toy world's base model: ``python -m videotuna_dpo.toy.train_base [--flow] [--out DIR]``.

The base model learns from a mix of clean and flawed videos (flicker, jitter, wrong colour, no
motion), so its samples are a mix too: the preference signal DPO then learns from. The shipped
checkpoints are this script's output with its defaults: videotuna_dpo/toy/base (backend ``toy``,
v-prediction DDIM, 3000 steps) and, with ``--flow``, videotuna_dpo/toy/flow_base (backend ``toy_flow``,
rectified flow, 2000 steps).
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

from videotuna_dpo.models.flow_matching import FlowMatchingSchedule
from videotuna_dpo.toy.backend import BUILTIN, save_toy_checkpoint, toy_scheduler
from videotuna_dpo.toy.flow_backend import FLOW_BUILTIN, toy_flow_scheduler
from videotuna_dpo.toy.model import ToyTextEncoder, ToyVideoUNet, tokenize
from videotuna_dpo.toy.world import FLAWS, all_specs, render

FRAMES, SIZE = 8, 32
FLOW_STEPS = 2000  # the shipped flow base; after 1000 steps its demo samples scored OmniScore 0.810, after 2000 0.849


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


class Objective:
    """What the network regresses: v-prediction on the DDIM schedule (``toy``) or the flow velocity (``toy_flow``)."""

    def __init__(self, flow: bool, shift: float = 1.0):
        self.flow = flow
        self.scheduler = toy_flow_scheduler(shift) if flow else toy_scheduler()
        self.schedule = FlowMatchingSchedule.from_scheduler_config(self.scheduler.config) if flow else None

    def sample_timesteps(self, n: int) -> torch.Tensor:
        if self.flow:
            return self.schedule.sample_timesteps(n, "cpu")
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,))

    def noisy_and_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        if self.flow:
            return self.schedule.add_noise(x0, noise, t), self.schedule.target(x0, noise, t)
        return self.scheduler.add_noise(x0, noise, t), self.scheduler.get_velocity(x0, noise, t)


def train(out: Path, steps: int = 3000, batch_size: int = 32, lr: float = 2e-3, clean_fraction: float = 0.5,
          caption_dropout: float = 0.1, seed: int = 0, ema_decay: float = 0.999, flow: bool = False,
          shift: float = 1.0) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    objective = Objective(flow, shift)
    unet, text_encoder, scheduler = ToyVideoUNet(), ToyTextEncoder(), objective.scheduler
    params = list(unet.parameters()) + list(text_encoder.parameters())
    # An exponential moving average of the weights samples far cleaner than the last iterate.
    ema_unet = EMAModel(unet.parameters(), decay=ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=ema_decay)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start, losses = time.time(), []
    bar = tqdm(range(steps), desc="toy flow base" if flow else "toy base", unit="step")
    for step in bar:
        x0, captions = training_batch(batch_size, clean_fraction, rng, caption_dropout)
        ids = tokenize(captions)
        text = text_encoder(ids)
        noise = torch.randn_like(x0)
        t = objective.sample_timesteps(batch_size)
        noisy, target = objective.noisy_and_target(x0, noise, t)
        pred = unet(noisy, t, text, ids != 0)
        loss = (pred - target).pow(2).mean()
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
    if flow:
        info.update(objective="flow_matching", shift=shift)
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow", action="store_true",
                        help="train the flow-matching model of backend toy_flow (velocity target, Euler sampling)")
    parser.add_argument("--shift", type=float, default=1.0, help="with --flow: the schedule's time shift")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"checkpoint directory (default: {BUILTIN}, with --flow {FLOW_BUILTIN})")
    parser.add_argument("--steps", type=int, default=None, help="default 3000, with --flow 2000")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clean-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or (FLOW_BUILTIN if args.flow else BUILTIN)
    steps = args.steps or (FLOW_STEPS if args.flow else 3000)
    info = train(out, steps, args.batch_size, args.lr, args.clean_fraction, seed=args.seed, flow=args.flow,
                 shift=args.shift)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
