"""Optical flow between frame pairs: OpenCV DIS or Farneback (no weights), RAFT from a local checkpoint.

Frames enter as uint8 RGB ``[N, H, W, 3]`` numpy pairs; flow leaves as float32 ``[N, H, W, 2]``
in pixels, (dx, dy), mapping each pixel of the first frame to the second.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import torch

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import find_weights, load_state_dict

FLOW_METHODS = ("dis", "farneback", "raft")
RAFT_FILE = "raft/raft_large_C_T_V2-1bb1363a.pth"


class FlowEstimator:
    """Flow for many frame pairs at once; ``method`` is one of :data:`FLOW_METHODS`."""

    def __init__(self, method: str = "dis", scorer: str = "flow", raft_weights: str | None = None,
                 device: torch.device | str = "cpu", raft_iters: int = 20):
        if method not in FLOW_METHODS:
            raise UserError(f"{scorer}: unknown flow method {method!r}; choose one of {', '.join(FLOW_METHODS)}")
        self.method = method
        self.device = torch.device(device)
        self.weights: Path | None = None
        self.raft_iters = raft_iters  # VBench runs RAFT with 20 refinement iterations
        if method == "raft":
            self.weights = find_weights(
                scorer, raft_weights, RAFT_FILE,
                "torchvision's RAFT-large C+T checkpoint (raft_large_C_T_V2-1bb1363a.pth)", "raft_weights",
            )
            from torchvision.models.optical_flow import raft_large

            self._raft = raft_large(weights=None, progress=False)
            self._raft.load_state_dict(load_state_dict(self.weights))
            self._raft.eval().to(self.device)
        elif method == "dis":
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    @property
    def label(self) -> str:
        return {"dis": "opencv-dis-medium", "farneback": "opencv-farneback", "raft": "raft-large"}[self.method]

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` x 2 -> float32 flow ``[N, H, W, 2]`` from ``first`` to ``second``."""
        both = np.concatenate([first, second])
        n = first.shape[0]
        return self.pairs(both, [(i, n + i) for i in range(n)])

    def pairs(self, frames: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` and index pairs (i, j) -> float32 flow ``[P, H, W, 2]`` from frame i to j."""
        if self.method == "raft":
            return self._raft_flow(frames[[i for i, _ in pairs]], frames[[j for _, j in pairs]])
        used = sorted({k for pair in pairs for k in pair})
        gray = {k: cv2.cvtColor(frames[k], cv2.COLOR_RGB2GRAY) for k in used}  # once per frame
        out = np.empty((len(pairs),) + frames.shape[1:3] + (2,), dtype=np.float32)
        for p, (i, j) in enumerate(pairs):
            if self.method == "dis":
                out[p] = self._dis.calc(gray[i], gray[j], None)
            else:
                out[p] = cv2.calcOpticalFlowFarneback(gray[i], gray[j], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        return out

    @torch.no_grad()
    def _raft_flow(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        n, h, w, _ = first.shape
        # RAFT needs sides divisible by 8 and at least 128; pad by replication and crop the flow back.
        ph, pw = max(128, h + (-h) % 8) - h, max(128, w + (-w) % 8) - w

        def prep(x: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            return torch.nn.functional.pad(t, (0, pw, 0, ph), mode="replicate")

        flows = self._raft(prep(first), prep(second), num_flow_updates=self.raft_iters)[-1]
        return flows[:, :, :h, :w].permute(0, 2, 3, 1).float().cpu().numpy()


def resize_for_flow(frames: np.ndarray, short_side: int | None) -> np.ndarray:
    """uint8 ``[F, H, W, 3]`` -> same with the short side at most ``short_side`` (area-resampled)."""
    h, w = frames.shape[1:3]
    if not short_side or min(h, w) <= short_side:
        return frames
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


@functools.lru_cache(maxsize=8)
def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return gx, gy


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: ``out(x) = image(x + flow(x))``; image ``[H, W, C]`` float32, flow ``[H, W, 2]``."""
    gx, gy = _pixel_grid(*flow.shape[:2])
    return cv2.remap(image, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
