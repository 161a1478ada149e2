"""Flow-based VBench dimensions: ``dynamic_degree`` and ``motion_smoothness``.

VBench uses RAFT (dynamic degree) and the AMT-S interpolator (motion smoothness). By default both
run here on OpenCV DIS flow, so they need no weights; RAFT runs from a local torchvision checkpoint
(``flow="raft"``). ``motion_smoothness`` with ``interpolator="amt"`` runs VBench's own interpolator,
AMT-S (``scoring/amt.py``, our implementation of the network), from the released ``amt-s.pth``
(option ``amt_weights`` or ``$VIDEOTUNA_WEIGHTS/amt/amt-s.pth``) and reproduces VBench's score;
``interpolator="auto"`` (the default) takes AMT-S when that file is given or in the weights directory,
else the flow one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from videotuna_dpo.scoring.amt import AMT_FILE, AMTS, frame_size_problem, midframes_uint8, shared_amt
from videotuna_dpo.scoring.base import (
    WEIGHTS_ENV,
    BaseScorer,
    find_weights,
    pick_backend,
    reject_unused,
    to_uint8_levels,
)
from videotuna_dpo.scoring.flow import FlowEstimator, warp
from videotuna_dpo.scoring.shared_frames import SharedFrames


def to_frames_uint8(video: torch.Tensor) -> np.ndarray:
    """Float ``[F, C, H, W]`` in [0, 1] -> uint8 ``[F, H, W, C]`` numpy (8-bit, as read from a file)."""
    return to_uint8_levels(video).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


DIS_MIN_SIDE = 16


def attach_flow(scorer: BaseScorer, method: str, raft_weights: str | None, raft_iters: int) -> None:
    """``scorer.flow``, the optical flow a motion scorer measures with, and what it says of its weights."""
    scorer.flow = FlowEstimator(method, scorer.name, raft_weights, scorer.device, raft_iters)
    if method == "dis":  # OpenCV's DIS fails on, or crashes the process with, frames under 16 px a side (8x8, 15x64)
        scorer.min_side, scorer.min_side_why = DIS_MIN_SIDE, " (OpenCV's DIS optical flow)"
    scorer.needs_weights = method == "raft"
    scorer.weights_hint = "raft_weights or $VIDEOTUNA_WEIGHTS/raft/..." if scorer.needs_weights else ""
    if scorer.flow.weights:
        scorer.weights_used["raft"] = str(scorer.flow.weights)


def top_magnitude(flow: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Flow ``[N, H, W, 2]`` -> float32 ``[N]``: mean of the largest ``fraction`` of per-pixel flow magnitudes.

    Computed in VBench's order of operations (float32 sqrt(u^2 + v^2), descending sort, mean of the
    first int(H * W * fraction)), so the same flow gives VBench's value to the last bit.
    """
    mag = np.sqrt(np.square(flow[..., 0]) + np.square(flow[..., 1])).reshape(flow.shape[0], -1)
    k = max(1, int(mag.shape[1] * fraction))
    return np.array([np.mean(-np.sort(-row)[:k]) for row in mag], dtype=mag.dtype)


def dynamic_threshold(height: int, width: int) -> float:
    """VBench's per-pair magnitude threshold: 6 px per 256 px of the short side."""
    return 6.0 * min(height, width) / 256.0


def required_pairs(num_frames: int) -> int:
    """How many pairs must exceed the threshold: VBench's round(4 N / 16) (0 for N <= 2)."""
    return round(4 * num_frames / 16)


def is_dynamic(magnitudes: Sequence[float], height: int, width: int, num_frames: int) -> bool:
    """VBench's rule: dynamic when at least ``required_pairs`` pair magnitudes exceed the threshold.

    As in VBench, a clip sampled down to 2 frames needs 0 pairs and is dynamic whatever its flow;
    one with no pair at all never is.
    """
    threshold = dynamic_threshold(height, width)
    return len(magnitudes) > 0 and sum(1 for m in magnitudes if m > threshold) >= required_pairs(num_frames)


class DynamicDegree(BaseScorer):
    """1 when the clip moves (VBench rule on top-5% flow magnitudes), else 0.

    ``flow="raft"`` is VBench's ``dynamic_degree``: RAFT-large (VBench's raft-things.pth or torchvision's
    checkpoint), frames at full size (``flow_short_side="auto"``), one frame in round(fps / 8) (fps: the
    ``fps`` option, else the file's frame rate that ``videotuna score`` passes, else 8), each
    pair padded to multiples of 8 as VBench pads it, 20 RAFT iterations, the top 5% of the flow
    magnitudes of the whole padded frame, VBench's threshold and count (:func:`is_dynamic`).
    Frames under 128 px (VBench's RAFT gives NaN there) are padded further for RAFT.
    The default ``flow="dis"`` approximates it without weights (OpenCV DIS flow on frames downscaled
    to a 256 px short side, the threshold scaled alike) with the same sampling and rule.
    """

    name = "dynamic_degree"
    kind = "quality"
    min_frames = 2

    def __init__(self, device: str | None = None, flow: str = "dis", raft_weights: str | None = None,
                 fps: float | None = None, flow_short_side: int | str | None = "auto", raft_iters: int = 20):
        super().__init__(device)
        attach_flow(self, flow, raft_weights, raft_iters)
        self.fps = None if fps is None else float(fps)  # None: the file's frame rate (8 when unknown)
        if flow_short_side == "auto":
            flow_short_side = None if flow == "raft" else 256
        self.flow_short_side = flow_short_side
        # 2: VBench's rule for every flow; RAFT as VBench runs it (full size, its padding, padded-frame magnitudes).
        self.version = f"vbench-dynamic_degree-2/{self.flow.label}"

    uses_fps = True
    uses_shared = True

    def frame_rate(self, fps: float | None) -> float:
        """The rate that sets the frame sampling: the ``fps`` option, else the file's, else 8."""
        return self.fps or fps or 8.0

    def pair_magnitudes(self, video: torch.Tensor, fps: float | None = None, shared: SharedFrames | None = None,
                        index: int = 0) -> tuple[np.ndarray, tuple[int, int], int]:
        """Float ``[F, C, H, W]`` -> (top-5% magnitude per consecutive pair ``[F'-1]``, flow (H, W), F').

        ``shared`` (with ``video`` its batch's ``index``-th) supplies the 8-bit frames, the resized frames
        and flow other scorers already measured.
        """
        shared = SharedFrames(video[None]) if shared is None else shared
        kept = list(range(0, video.shape[0], max(1, round(self.frame_rate(fps) / 8.0))))  # VBench: every round(fps / 8)-th
        # The threshold scales with min(H, W), so measuring flow on a downscaled clip keeps the rule.
        size = shared.resized(index, self.flow_short_side).shape[1:3]
        flow = shared.flow(index, self.flow, list(zip(kept[:-1], kept[1:])), self.flow_short_side,
                           vbench_padded=self.flow.method == "raft")
        return top_magnitude(flow), size, len(kept)

    def score(self, videos: torch.Tensor, prompts: Sequence[str], fps: float | None = None,
              shared: SharedFrames | None = None) -> torch.Tensor:
        shared = SharedFrames(videos) if shared is None else shared
        out = []
        for b, video in enumerate(videos):
            mags, (h, w), n = self.pair_magnitudes(video, fps, shared, b)
            out.append(1.0 if is_dynamic(mags.tolist(), h, w, n) else 0.0)
        return torch.tensor(out, dtype=torch.float64)


def interpolate_midframes(frames: np.ndarray, flow: FlowEstimator) -> np.ndarray:
    """uint8 ``[K, H, W, 3]`` key frames -> uint8 ``[K-1, H, W, 3]`` frames halfway between neighbours.

    Bidirectional flow, linear-motion approximation of the flow from the middle frame to each end,
    both ends warped there and averaged.
    """
    k = frames.shape[0]
    f01 = flow.pairs(frames, [(j, j + 1) for j in range(k - 1)])
    f10 = flow.pairs(frames, [(j + 1, j) for j in range(k - 1)])
    return midframes_from_flow(frames, f01, f10)


def midframes_from_flow(frames: np.ndarray, f01: np.ndarray, f10: np.ndarray) -> np.ndarray:
    """:func:`interpolate_midframes` given the flow forward ``f01`` and back ``f10`` between neighbouring key frames."""
    out = np.empty((frames.shape[0] - 1,) + frames.shape[1:], dtype=np.uint8)
    for j in range(out.shape[0]):
        ft0 = 0.25 * (f10[j] - f01[j])  # middle -> start
        ft1 = -ft0  # middle -> end
        mid = 0.5 * (warp(frames[j].astype(np.float32), ft0) + warp(frames[j + 1].astype(np.float32), ft1))
        out[j] = np.clip(np.rint(mid), 0, 255).astype(np.uint8)
    return out


INTERPOLATORS = ("flow", "amt", "auto")
AMT_WHAT = "VBench's AMT-S checkpoint (amt-s.pth, the file VBench keeps in its cache as amt_model/amt-s.pth)"


class MotionSmoothness(BaseScorer):
    """VBench motion smoothness: odd frames interpolated from even ones, (255 - MAE) / 255.

    ``interpolator="amt"`` follows VBench exactly: AMT-S on each pair of neighbouring even frames
    (8-bit levels / 255, padded to multiples of 16, t = 0.5), predictions x 255 truncated to uint8,
    MAE against the odd frames. VBench may shrink frames on a GPU whose memory it deems too small
    (only for frames of millions of pixels); here frames always run at full size, as VBench does on CPU.
    Frames under 113 px a side (where VBench's AMT-S yields NaN) are refused (:meth:`unscorable`).
    ``interpolator="flow"`` (what ``auto`` picks without AMT-S weights) approximates it with optical flow.
    """

    name = "motion_smoothness"
    kind = "quality"
    min_frames = 3

    def __init__(self, device: str | None = None, interpolator: str = "auto", flow: str = "dis",
                 raft_weights: str | None = None, raft_iters: int = 20, amt_weights: str | None = None,
                 amt_max_pairs: int | None = None):
        super().__init__(device)
        interpolator = pick_backend(self.name, "interpolator", interpolator, INTERPOLATORS, amt_weights, AMT_FILE,
                                    "amt", "flow")
        if interpolator == "amt":
            reject_unused(self.name, interpolator, flow=(flow, "dis"), raft_weights=(raft_weights, None),
                          raft_iters=(raft_iters, 20))
        else:
            reject_unused(self.name, interpolator, amt_weights=(amt_weights, None), amt_max_pairs=(amt_max_pairs, None))
        self.interpolator = interpolator
        self.flow: FlowEstimator | None = None
        self.amt: AMTS | None = None
        self.amt_max_pairs = amt_max_pairs
        if interpolator == "amt":
            path = find_weights(self.name, amt_weights, AMT_FILE, AMT_WHAT, "amt_weights")
            self.amt = shared_amt(path, self.device)
            self.needs_weights = True
            self.weights_hint = f"amt_weights or ${WEIGHTS_ENV}/{AMT_FILE}"
            self.weights_used["amt"] = str(path)
            self.version = "vbench-motion_smoothness-1/amt-s"
            return
        attach_flow(self, flow, raft_weights, raft_iters)
        # RAFT flow is 2 since RAFT runs with VBench's padding and input scaling (shared with dynamic_degree).
        revision = 2 if self.flow.method == "raft" else 1
        self.version = f"vbench-motion_smoothness-{revision}/flow-interp-{self.flow.label}"

    def midframes(self, frames: np.ndarray) -> np.ndarray:
        """uint8 ``[F, H, W, 3]`` -> uint8 ``[ceil(F/2)-1, H, W, 3]``: frames between neighbouring even frames."""
        if self.amt is not None:
            return midframes_uint8(self.amt, frames[0::2], self.amt_max_pairs)
        return interpolate_midframes(frames[0::2], self.flow)

    def unscorable(self, num_frames: int, height: int, width: int) -> str | None:
        too_small = frame_size_problem(height, width) if self.amt is not None else None
        return super().unscorable(num_frames, height, width) or too_small

    uses_shared = True

    def score(self, videos: torch.Tensor, prompts: Sequence[str], shared: SharedFrames | None = None) -> torch.Tensor:
        shared = SharedFrames(videos) if shared is None else shared
        out = []
        for b in range(videos.shape[0]):
            frames = shared.frames(b)
            if self.amt is not None:
                mids = self.midframes(frames)
            else:  # the flow between even frames, at full size, measured once for every scorer of the batch
                keys = list(range(0, frames.shape[0], 2))
                n = len(keys) - 1  # forward and back in one call: the pairs spread evenly over the flow threads
                flow = shared.flow(b, self.flow, list(zip(keys[:-1], keys[1:])) + list(zip(keys[1:], keys[:-1])))
                mids = midframes_from_flow(frames[0::2], flow[:n], flow[n:])
            odd = frames[1::2][: mids.shape[0]]
            mae = np.abs(mids.astype(np.int16) - odd.astype(np.int16)).sum(dtype=np.int64) / mids.size
            out.append((255.0 - mae) / 255.0)
        return torch.tensor(out, dtype=torch.float64)
