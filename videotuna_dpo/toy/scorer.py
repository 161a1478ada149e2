"""Scorer ``toy_alignment``: does a toy-world video show its caption's colour, shape and direction?"""

from __future__ import annotations

from typing import Sequence

import torch

from videotuna_dpo.scoring.base import BaseScorer
from videotuna_dpo.toy.world import BACKGROUND, COLORS, DIRECTIONS, parse_caption

OBJECT_THRESHOLD = 0.25  # L1 distance from the background (sum over RGB in [0, 1]) that counts as object
MIN_TRAVEL = 3.0  # pixels the object must move, first to last frame, to count as moving


def _object_masks(video: torch.Tensor) -> torch.Tensor:
    """``[F, 3, H, W]`` in [0, 1] -> bool ``[F, H, W]``: pixels that differ from the background."""
    background = torch.tensor(BACKGROUND, dtype=video.dtype, device=video.device).view(1, 3, 1, 1) / 255
    return (video - background).abs().sum(dim=1) > OBJECT_THRESHOLD


def alignment(video: torch.Tensor, caption: str) -> tuple[float, float, float]:
    """(colour, shape, direction) agreement of one video ``[F, 3, H, W]`` with its caption, each in [0, 1]."""
    spec = parse_caption(caption)
    masks = _object_masks(video)
    palette = torch.tensor(list(COLORS.values()), dtype=video.dtype, device=video.device) / 255  # [K, 3]
    names = list(COLORS)
    colour_hits, shape_hits, centroids = [], [], []
    h, w = video.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, device=video.device), torch.arange(w, device=video.device), indexing="ij")
    for frame, mask in zip(video, masks):
        n = int(mask.sum())
        if n < 4:
            colour_hits.append(0.0)
            shape_hits.append(0.0)
            continue
        mean = frame[:, mask].mean(dim=1)  # [3]
        colour_hits.append(float(names[int((palette - mean).abs().sum(1).argmin())] == spec.color))
        y0, y1 = ys[mask].min(), ys[mask].max()
        x0, x1 = xs[mask].min(), xs[mask].max()
        fill = n / float((y1 - y0 + 1) * (x1 - x0 + 1))
        # A filled square fills its bounding box; a disc fills pi/4 of it.
        shape_hits.append(float((fill > 0.9) == (spec.shape == "square")))
        centroids.append((float(xs[mask].float().mean()), float(ys[mask].float().mean())))
    direction = 0.0
    if len(centroids) >= 2:
        dx, dy = centroids[-1][0] - centroids[0][0], centroids[-1][1] - centroids[0][1]
        ux, uy = DIRECTIONS[spec.direction]
        travel = (dx * dx + dy * dy) ** 0.5
        if travel >= MIN_TRAVEL and (dx * ux + dy * uy) / travel > 0.7:
            direction = 1.0
    count = len(colour_hits)
    return sum(colour_hits) / count, sum(shape_hits) / count, direction


class ToyAlignment(BaseScorer):
    """Mean of colour, shape and direction agreement with the caption, in [0, 1]; needs no weights."""

    name = "toy_alignment"
    kind = "semantic"
    version = "toy-alignment-1"
    min_frames = 2
    score_range = (0.0, 1.0)  # joins the OmniScore as a semantic dimension with this normalisation

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([sum(alignment(v, p)) / 3 for v, p in zip(videos, prompts)], dtype=torch.float64)
