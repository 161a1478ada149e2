"""``temporal_flickering`` (VBench): one minus the mean absolute change between consecutive frames."""

from __future__ import annotations

from typing import Sequence

import torch

from videotuna_dpo.scoring.base import BaseScorer, to_uint8_levels


def flickering_score(videos: torch.Tensor) -> torch.Tensor:
    """``[B, F, C, H, W]`` on 8-bit levels 0..255 -> ``[B]``: (255 - mean_i mean|F_i - F_i+1|) / 255.

    Differences are summed as integers, so the result is exact.
    """
    levels = videos.to(torch.int16)
    total = (levels[:, 1:] - levels[:, :-1]).abs_().sum(dim=(1, 2, 3, 4), dtype=torch.int64)  # [B]
    mae = total.double() / levels[0, 1:].numel()  # mean over (F - 1) C H W differences
    return (255.0 - mae) / 255.0


class TemporalFlickering(BaseScorer):
    """Exact VBench temporal flickering on 8-bit levels; needs no weights."""

    name = "temporal_flickering"
    kind = "quality"
    version = "vbench-temporal_flickering-1"
    min_frames = 2

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return flickering_score(to_uint8_levels(videos))
