"""Videos/second of the no-weights dimensions on 16-frame 256x256 videos (CPU); prints JSON.

Also motion_smoothness with VBench's AMT-S interpolator (random weights: the speed does not depend
on them) on a few videos, reported apart from the no-weights target.

Run: python benchmarks/bench_scoring.py [--videos 16] [--threads 2] [--amt-videos 4]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_videos(n: int, frames: int = 16, size: int = 256, seed: int = 0) -> torch.Tensor:
    """Float ``[n, frames, 3, size, size]``: textured backgrounds with a disk moving at a random speed."""
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
    return torch.from_numpy(out)


def amt_videos_per_second(videos: torch.Tensor, batch_size: int) -> float:
    """motion_smoothness with interpolator='amt', AMT-S loaded from a checkpoint file of random weights."""
    from videotuna_dpo.scoring.amt import AMTS
    from videotuna_dpo.scoring.motion import MotionSmoothness

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "amt-s.pth"
        torch.manual_seed(0)
        torch.save({"state_dict": AMTS().state_dict()}, path)
        scorer = MotionSmoothness("cpu", interpolator="amt", amt_weights=str(path))
    scorer(videos[:1], ["warm-up"])
    start = time.perf_counter()
    for batch in videos.split(batch_size):
        scorer(batch, ["p"] * batch.shape[0])
    return videos.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads (the target is 2 cores)")
    parser.add_argument("--amt-videos", type=int, default=4, help="videos for the AMT-S line (0 leaves it out)")
    args = parser.parse_args()
    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    from videotuna_dpo.scoring.flickering import TemporalFlickering
    from videotuna_dpo.scoring.motion import DynamicDegree, MotionSmoothness

    videos = synthetic_videos(args.videos)
    scorers = {"temporal_flickering": TemporalFlickering("cpu"), "dynamic_degree": DynamicDegree("cpu"),
               "motion_smoothness": MotionSmoothness("cpu")}
    for scorer in scorers.values():  # warm-up
        scorer(videos[:1], ["warm-up"])
    seconds = {}
    for name, scorer in scorers.items():
        start = time.perf_counter()
        for batch in videos.split(args.batch_size):
            scorer(batch, ["p"] * batch.shape[0])
        seconds[name] = time.perf_counter() - start
    total = sum(seconds.values())
    result = {
        "videos": args.videos,
        "frames": 16,
        "resolution": "256x256",
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "videos_per_second": {name: round(args.videos / s, 2) for name, s in seconds.items()},
        "videos_per_second_all_three": round(args.videos / total, 2),
        "target_all_three": 4.0,
        "meets_target": args.videos / total >= 4.0 and math.isfinite(total),
        "flow": scorers["dynamic_degree"].flow.label,
    }
    if args.amt_videos > 0:
        result["amt_videos"] = args.amt_videos
        result["videos_per_second_motion_smoothness_amt"] = round(
            amt_videos_per_second(synthetic_videos(args.amt_videos, seed=1), args.batch_size), 2
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
