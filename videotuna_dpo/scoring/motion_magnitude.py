"""``motion_magnitude``: the mean optical-flow magnitude of a video, in pixels per frame.

Not an OmniScore dimension (it has no range, so it joins no aggregate): it is what `videotuna eval`
always reports next to ``dynamic_degree`` to show whether tuning made videos move less (DPO's drift
toward low motion), and what ``videotuna pairs --motion-guard`` compares between winner and loser.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from videotuna_dpo.scoring.base import BaseScorer
from videotuna_dpo.scoring.motion import attach_flow
from videotuna_dpo.scoring.shared_frames import SharedFrames

FLOW_SHORT_SIDE = 256  # flow is measured at most at this short side, then scaled back to the file's pixels


def mean_flow_magnitude(flow: np.ndarray) -> float:
    """Flow ``[N, H, W, 2]`` -> the mean of sqrt(dx^2 + dy^2) over every pixel of every pair."""
    return float(np.sqrt(np.square(flow[..., 0], dtype=np.float64) + np.square(flow[..., 1], dtype=np.float64)).mean())


class MotionMagnitude(BaseScorer):
    """Mean optical-flow magnitude between consecutive frames (OpenCV DIS or RAFT), pixels of the file per frame."""

    name = "motion_magnitude"
    kind = "quality"
    min_frames = 2
    score_range = None  # a measurement, not an OmniScore dimension

    def __init__(self, device: str | None = None, flow: str = "dis", raft_weights: str | None = None,
                 raft_iters: int = 20, flow_short_side: int | None = FLOW_SHORT_SIDE):
        super().__init__(device)
        attach_flow(self, flow, raft_weights, raft_iters)
        self.flow_short_side = flow_short_side
        self.version = f"motion_magnitude-1/{self.flow.label}"

    uses_shared = True

    def magnitude(self, video: torch.Tensor, shared: SharedFrames | None = None, index: int = 0) -> float:
        """Float ``[F, C, H, W]`` in [0, 1] -> mean flow magnitude in pixels of ``video`` per frame.

        ``shared`` (with ``video`` its batch's ``index``-th) supplies frames and flow other scorers measured.
        """
        shared = SharedFrames(video[None]) if shared is None else shared
        full, small = shared.frames(index), shared.resized(index, self.flow_short_side)
        flow = shared.flow(index, self.flow, [(i, i + 1) for i in range(full.shape[0] - 1)], self.flow_short_side)
        return mean_flow_magnitude(flow) * full.shape[1] / small.shape[1]  # back to the file's pixels

    def score(self, videos: torch.Tensor, prompts: Sequence[str], shared: SharedFrames | None = None) -> torch.Tensor:
        shared = SharedFrames(videos) if shared is None else shared
        return torch.tensor([self.magnitude(v, shared, b) for b, v in enumerate(videos)], dtype=torch.float64)
