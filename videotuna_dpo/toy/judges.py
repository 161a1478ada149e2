"""Judges of the toy world: scorers the toy loop's training never uses (``eval.judges``).

``toy_travel``: how far the object travels along its caption's direction, as a share of the path the
world moves it (0.45 of the frame), in [0, 1]: a static or slowed-down video scores low whatever its
smoothness. ``toy_shape_fidelity``: per frame, the IoU of the object with the caption's shape drawn
at the world's size where the object is; blurred, shrunk, smeared or wrong shapes score low (the
training scorer ``toy_alignment`` only checks a fill ratio). Neither is an OmniScore dimension.
"""

from __future__ import annotations

from typing import Sequence

import torch

from videotuna_dpo.scoring.base import BaseScorer
from videotuna_dpo.toy.scorer import _object_masks
from videotuna_dpo.toy.world import DIRECTIONS, _mask, parse_caption

TRAVEL = 0.45  # the world's path length, as a share of the frame side (world.render)
RADIUS = 0.14  # the world's object radius, as a share of the frame side
MIN_PIXELS = 4  # fewer object pixels than this: no object in the frame


def _centroid(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


def travel(video: torch.Tensor, caption: str) -> float:
    """``[F, 3, H, W]`` in [0, 1] -> the object's travel along the caption's direction / the world's path, in [0, 1]."""
    spec = parse_caption(caption)
    seen = [_centroid(m) for m in _object_masks(video) if int(m.sum()) >= MIN_PIXELS]
    if len(seen) < 2:
        return 0.0
    ux, uy = DIRECTIONS[spec.direction]
    along = (seen[-1][0] - seen[0][0]) * ux + (seen[-1][1] - seen[0][1]) * uy
    return min(1.0, max(0.0, along / (TRAVEL * video.shape[-1])))


def shape_fidelity(video: torch.Tensor, caption: str) -> float:
    """``[F, 3, H, W]`` in [0, 1] -> mean over frames of the IoU of the object with the ideal shape there (0 if none)."""
    spec = parse_caption(caption)
    size = video.shape[-1]
    ious = []
    for mask in _object_masks(video):
        if int(mask.sum()) < MIN_PIXELS:
            ious.append(0.0)
            continue
        cx, cy = _centroid(mask)
        ideal = _mask(spec.shape, cx, cy, RADIUS * size, size).to(mask.device)
        ious.append(float((mask & ideal).sum()) / float((mask | ideal).sum()))
    return sum(ious) / len(ious)


class _CaptionJudge(BaseScorer):
    """A judge scoring each video against its caption with ``measure(video, caption)``; no weights."""

    kind = "quality"
    score_range = None  # a judge, never an OmniScore dimension

    @staticmethod
    def measure(video: torch.Tensor, caption: str) -> float:
        raise NotImplementedError

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.measure(v, p) for v, p in zip(videos, prompts)], dtype=torch.float64)


class ToyTravel(_CaptionJudge):
    """Share of the world's path the object travels in its caption's direction, in [0, 1]."""

    name = "toy_travel"
    version = "toy-travel-1"
    min_frames = 2
    measure = staticmethod(travel)


class ToyShapeFidelity(_CaptionJudge):
    """Mean IoU of the object with its caption's shape at the world's size, in [0, 1]."""

    name = "toy_shape_fidelity"
    version = "toy-shape-fidelity-1"
    min_frames = 1
    measure = staticmethod(shape_fidelity)
