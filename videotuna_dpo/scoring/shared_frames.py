"""One batch's 8-bit frames and what the no-weights scorers derive from them, each computed once.

``videotuna score`` decodes a video once; every scorer then receives the same float batch
``[B, F, C, H, W]``. Without this object each of them converted it back to 8-bit levels, resized it
and measured optical flow on its own. :class:`SharedFrames` holds, for one batch, the 8-bit frames,
the frames resized to each short side a scorer asks for, and the flow of each (frame pair, size,
flow method) asked for, so scorers that need the same thing get the same array, computed once.

A scorer called without one builds its own and runs the same code, so its scores are the same
alone and together.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from videotuna_dpo.scoring.base import to_uint8_levels
from videotuna_dpo.scoring.flow import FlowEstimator, resize_for_flow

FLOW_CACHE_BYTES = 512 << 20  # flow kept for reuse per batch; past it, flow is still computed, just not kept


class SharedFrames:
    """A batch ``videos`` (float ``[B, F, C, H, W]`` in [0, 1]) and its derived arrays, memoised.

    ``levels`` (uint8 ``[B, F, C, H, W]``), when given, are the 8-bit frames ``videos`` was made from
    (``videos == levels / 255``), e.g. the decoded file; otherwise they are computed from ``videos``
    as :func:`~videotuna_dpo.scoring.base.to_uint8_levels` does.
    """

    def __init__(self, videos: torch.Tensor, levels: torch.Tensor | None = None,
                 flow_cache_bytes: int = FLOW_CACHE_BYTES):
        if levels is not None and (levels.dtype != torch.uint8 or tuple(levels.shape) != tuple(videos.shape)):
            raise ValueError(f"levels must be uint8 of the videos' shape {tuple(videos.shape)}, "
                             f"got {levels.dtype} {tuple(levels.shape)}")
        self.videos = videos
        self._levels = None if levels is None else levels.cpu()
        self._frames: dict[int, np.ndarray] = {}
        self._resized: dict[tuple[int, int], np.ndarray] = {}
        self._flow: dict[tuple, np.ndarray] = {}
        self._flow_bytes = 0
        self.flow_cache_bytes = flow_cache_bytes
        self.flow_pairs_computed = 0  # pairs the flow estimators actually ran on (the rest came from the memo)

    def levels(self) -> torch.Tensor:
        """uint8 ``[B, F, C, H, W]`` on the CPU: the 8-bit frames."""
        if self._levels is None:
            self._levels = to_uint8_levels(self.videos).to(torch.uint8).cpu()
        return self._levels

    def frames(self, b: int) -> np.ndarray:
        """uint8 ``[F, H, W, 3]`` numpy: video ``b``'s frames, channels last."""
        if b not in self._frames:
            self._frames[b] = self.levels()[b].permute(0, 2, 3, 1).contiguous().numpy()
        return self._frames[b]

    def resized(self, b: int, short_side: int | None) -> np.ndarray:
        """Video ``b``'s frames with the short side at most ``short_side`` (:func:`resize_for_flow`), resized once."""
        frames = self.frames(b)
        if not short_side or min(frames.shape[1:3]) <= short_side:
            return frames
        key = (b, int(short_side))
        if key not in self._resized:
            self._resized[key] = resize_for_flow(frames, short_side)
        return self._resized[key]

    def flow(self, b: int, estimator: FlowEstimator, pairs: Sequence[tuple[int, int]], short_side: int | None = None,
             vbench_padded: bool = False) -> np.ndarray:
        """float32 ``[P, h, w, 2]``: flow from frame i to frame j (indices of the video) for each pair, on the
        frames :meth:`resized` to ``short_side``; pairs already measured at that size by an estimator of the
        same method and settings are not measured again."""
        pairs = [(int(i), int(j)) for i, j in pairs]
        frames = self.resized(b, short_side)
        if not pairs:
            return np.empty((0,) + frames.shape[1:3] + (2,), dtype=np.float32)
        base = (b, frames.shape[1:3], estimator.key, vbench_padded)
        missing = list(dict.fromkeys(p for p in pairs if base + p not in self._flow))
        computed = {}
        if missing:
            flow = estimator.pairs(frames, missing, vbench_padded=vbench_padded)
            flow.setflags(write=False)  # kept for other scorers: none may change it in place
            self.flow_pairs_computed += len(missing)
            for pair, f in zip(missing, flow):
                computed[pair] = f
                if self._flow_bytes + f.nbytes <= self.flow_cache_bytes:
                    self._flow[base + pair] = f
                    self._flow_bytes += f.nbytes
        if missing == pairs:  # nothing came from the memo (or twice): the estimator's array as it is
            return flow
        return np.stack([computed[p] if p in computed else self._flow[base + p] for p in pairs])
