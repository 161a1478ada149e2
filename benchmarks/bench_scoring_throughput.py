"""``scoring_throughput``: videos/second of the scorers on 16-frame 256x256 videos on the CPU; prints JSON.

- The no-weights dimensions (temporal flickering, dynamic degree, motion smoothness; and with motion
  magnitude, which ``videotuna eval`` adds) each alone and together, as ``videotuna score`` runs them:
  one :func:`~videotuna_dpo.scoring.build.score_batch` per batch of decoded 8-bit frames (decoding
  itself is left out). Together they share the 8-bit frames and the optical flow; the target is that
  together they run at least 8 videos/s on 2 cores. ``together_over_slowest_alone`` (1.0: the whole
  set costs no more than its slowest member) depends less on the machine's load than the rates.
- Each model dimension alone with random weights of the real architecture (the speed does not depend
  on the values): DINO ViT-B/16, CLIP ViT-L/14 + LAION head, ViCLIP-L/14, MUSIQ (when pyiqa is
  installed), AMT-S, RAFT-large.

Each figure is the best of ``--repeats`` timed passes (a shared machine only ever slows a pass down);
the load average before and after is recorded, and the CPU time per video (all threads), which other
jobs on the machine hardly change.

Run: python benchmarks/bench_scoring_throughput.py [--videos 16] [--threads 2] [--model-videos 2] [--models all|none|NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

NO_WEIGHTS = ("temporal_flickering", "dynamic_degree", "motion_smoothness")
MODELS = ("subject_consistency", "aesthetic_quality", "overall_consistency", "imaging_quality",
          "motion_smoothness_amt", "dynamic_degree_raft")
TARGET = 8.0


def synthetic_videos(n: int, frames: int = 16, size: int = 256, seed: int = 0) -> torch.Tensor:
    """uint8 ``[n, frames, 3, size, size]``: textured backgrounds with a disk moving at a random speed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, frames, 3, size, size), dtype=np.float32)
    for i in range(n):
        background = 0.4 + 0.2 * np.sin(xx / rng.uniform(5, 15)) * np.cos(yy / rng.uniform(5, 15))
        speed, y0 = rng.uniform(0, 8), rng.uniform(60, 196)
        for f in range(frames):
            img = background.copy()
            img[(xx - 40 - speed * f) ** 2 + (yy - y0) ** 2 < 40**2] = 0.9
            out[i, f] = np.stack([img, 0.8 * img, 1 - img])
    return torch.from_numpy(np.rint(out * 255.0).astype(np.uint8))


def videos_per_second(models: dict, levels: torch.Tensor, batch_size: int, repeats: int) -> tuple[float, float]:
    """(videos/s, CPU seconds per video) of the best of ``repeats`` passes of ``score_batch`` over ``levels``
    (uint8 ``[N, F, C, H, W]``) in batches. CPU time (all threads) hardly depends on other jobs; wall time does."""
    from videotuna_dpo.scoring.build import score_batch

    batches = [(b, b.float() / 255.0) for b in levels.split(batch_size)]
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for level, clip in batches:
            score_batch(models, clip, ["a prompt"] * clip.shape[0], 8.0, level)
        wall = time.perf_counter() - start
        if wall < best:
            best, cpu = wall, time.process_time() - start_cpu
    return levels.shape[0] / best, cpu / levels.shape[0]


def no_weights_figures(levels: torch.Tensor, batch_size: int, repeats: int) -> dict:
    from videotuna_dpo.scoring.flickering import TemporalFlickering
    from videotuna_dpo.scoring.flow import flow_threads
    from videotuna_dpo.scoring.motion import DynamicDegree, MotionSmoothness
    from videotuna_dpo.scoring.motion_magnitude import MotionMagnitude

    scorers = {"temporal_flickering": TemporalFlickering("cpu"), "dynamic_degree": DynamicDegree("cpu"),
               "motion_smoothness": MotionSmoothness("cpu", interpolator="flow"),
               "motion_magnitude": MotionMagnitude("cpu")}
    videos_per_second(scorers, levels[:1], 1, 1)  # warm-up
    alone = {name: videos_per_second({name: s}, levels, batch_size, repeats) for name, s in scorers.items()}
    three = videos_per_second({name: scorers[name] for name in NO_WEIGHTS}, levels, batch_size, repeats)
    four = videos_per_second(scorers, levels, batch_size, repeats)
    slowest = min(alone[name][0] for name in NO_WEIGHTS)
    return {
        "alone": {name: round(v, 2) for name, (v, _) in alone.items()},
        "together": {"+".join(NO_WEIGHTS): round(three[0], 2), "+".join(scorers): round(four[0], 2)},
        # What separate runs would give (every scorer converting frames and measuring flow on its own).
        "separately_summed": round(1.0 / sum(1.0 / alone[name][0] for name in NO_WEIGHTS), 2),
        "together_over_slowest_alone": round(three[0] / slowest, 3),
        "cpu_ms_per_video": {**{name: round(1000 * c, 1) for name, (_, c) in alone.items()},
                             "together": round(1000 * three[1], 1), "together_with_motion_magnitude": round(1000 * four[1], 1)},
        "target_together": TARGET,
        "meets_target": three[0] >= TARGET,
        "flow": scorers["dynamic_degree"].flow.label,
        "flow_threads": flow_threads(),
    }


def build_model(name: str, tmp: Path):
    """The scorer ``name`` of :data:`MODELS` on the CPU, loaded from files of random weights of its real architecture."""
    torch.manual_seed(0)
    if name == "subject_consistency":
        import timm

        from videotuna_dpo.scoring.dino import SubjectConsistency

        path = tmp / "dino.pth"
        torch.save(timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0).state_dict(), path)
        return SubjectConsistency("cpu", weights=str(path)), "DINO ViT-B/16 (timm vit_base_patch16_224.dino)"
    if name == "aesthetic_quality":
        import open_clip

        from videotuna_dpo.scoring.clip_scorers import AestheticQuality

        clip, head = tmp / "clip.pth", tmp / "head.pth"
        torch.save(open_clip.create_model("ViT-L-14-quickgelu", pretrained=None).state_dict(), clip)
        torch.save(torch.nn.Linear(768, 1).state_dict(), head)
        return (AestheticQuality("cpu", clip_weights=str(clip), head_weights=str(head)),
                "CLIP ViT-L/14 (open_clip ViT-L-14-quickgelu) + LAION linear head, every frame")
    if name == "overall_consistency":
        from videotuna_dpo.scoring.clip_scorers import OverallConsistency
        from videotuna_dpo.scoring.viclip import ViCLIP

        path = tmp / "viclip.pth"
        torch.save(ViCLIP().state_dict(), path)
        return OverallConsistency("cpu", backend="viclip", viclip_weights=str(path)), "ViCLIP-L/14, 8 frames"
    if name == "imaging_quality":
        from pyiqa.archs.musiq_arch import MUSIQ

        from videotuna_dpo.scoring.imaging import ImagingQuality

        path = tmp / "musiq.pth"
        torch.save(MUSIQ(pretrained=False).state_dict(), path)
        return ImagingQuality("cpu", backend="musiq", musiq_weights=str(path)), "MUSIQ (pyiqa), every frame"
    if name == "motion_smoothness_amt":
        from videotuna_dpo.scoring.amt import AMTS
        from videotuna_dpo.scoring.motion import MotionSmoothness

        path = tmp / "amt-s.pth"
        torch.save({"state_dict": AMTS().state_dict()}, path)
        return MotionSmoothness("cpu", interpolator="amt", amt_weights=str(path)), "AMT-S, 7 interpolated frames"
    if name == "dynamic_degree_raft":
        from torchvision.models.optical_flow import raft_large

        from videotuna_dpo.scoring.motion import DynamicDegree

        path = tmp / "raft.pth"
        torch.save(raft_large(weights=None, progress=False).state_dict(), path)
        return DynamicDegree("cpu", flow="raft", raft_weights=str(path)), "RAFT-large, 15 pairs, 20 iterations"
    raise ValueError(f"unknown model dimension {name!r}; choose from {', '.join(MODELS)}")


def model_figures(names: list[str], levels: torch.Tensor, batch_size: int) -> dict:
    out = {}
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                scorer, architecture = build_model(name, Path(tmp))
            except ImportError as exc:  # MUSIQ needs pyiqa
                out[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                continue
        videos_per_second({name: scorer}, levels[:1], 1, 1)  # warm-up
        rate, cpu = videos_per_second({name: scorer}, levels, batch_size, 1)
        out[name] = {"videos_per_second": round(rate, 3), "cpu_seconds_per_video": round(cpu, 2),
                     "architecture": architecture, "videos": int(levels.shape[0])}
        del scorer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads (the target is 2 cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the no-weights figures; the best counts")
    parser.add_argument("--model-videos", type=int, default=2, help="videos per model dimension")
    parser.add_argument("--models", default="all", help=f"all, none, or some of {','.join(MODELS)}")
    args = parser.parse_args()
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    names = list(MODELS) if args.models == "all" else [] if args.models == "none" else args.models.split(",")
    load_before = os.getloadavg()
    levels = synthetic_videos(args.videos)
    result = {
        "videos": args.videos, "frames": 16, "resolution": "256x256", "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "no_weights": no_weights_figures(levels, args.batch_size, args.repeats),
    }
    if names:
        result["models"] = model_figures(names, synthetic_videos(args.model_videos, seed=1),
                                         min(args.batch_size, args.model_videos))
    result["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
