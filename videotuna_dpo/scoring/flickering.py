"""``temporal_flickering`` (VBench): one minus the mean absolute change between consecutive frames."""

from __future__ import annotations

from typing import Sequence

import cv2
import torch

from videotuna_dpo.scoring.base import BaseScorer
from videotuna_dpo.scoring.shared_frames import SharedFrames


def flickering_score(videos: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` on 8-bit levels 0..255 -> ``[B]``: (255 - mean_i mean|F_i - F_i+1|) / 255.

    Differences are summed as integers, so the result is exact.
    """
    levels = videos.to(torch.int16)
    total = (levels[:, 1:] - levels[:, :-1]).abs_().sum(dim=(1, 2, 3, 4), dtype=torch.int64)  # [B]
    mae = total.double() / levels[0, 1:].numel()  # mean over (F - 1) C H W differences
    return (255.0 - mae) / 255.0


def flickering_score_uint8(levels: torch.Tensor) -> torch.Tensor:
    """:func:`flickering_score` of uint8 ``[B, F, C, H, W]`` on the CPU, through OpenCV's L1 norm (~100x faster).

    OpenCV sums uint8 differences in integers and adds the blocks in float64, exact below 2**53, so
    the value is the same to the last bit.
    """
    frames = levels.reshape(levels.shape[0], levels.shape[1], -1).numpy()  # [B, F, C*H*W]
    total = torch.tensor([sum(cv2.norm(video[i], video[i + 1], cv2.NORM_L1) for i in range(video.shape[0] - 1))
                          for video in frames], dtype=torch.float64)
    mae = total / frames[0, 1:].size
    return (255.0 - mae) / 255.0


class TemporalFlickering(BaseScorer):
    """Exact VBench temporal flickering on 8-bit levels; needs no weights."""

    name = "temporal_flickering"
    kind = "quality"
    version = "vbench-temporal_flickering-1"
    min_frames = 2
    uses_shared = True

    def score(self, videos: torch.Tensor, prompts: Sequence[str], shared=None) -> torch.Tensor:
        return flickering_score_uint8((SharedFrames(videos) if shared is None else shared).levels())
