"""A procedural text-to-video world: "a red square moving left" rendered exactly, plus flawed takes.

Videos are uint8 ``[F, 3, H, W]``; every caption names a colour, a shape and a direction.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

COLORS = {"red": (220, 50, 50), "green": (50, 190, 70), "blue": (60, 90, 230), "yellow": (225, 205, 45)}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
FLAWS = ("flicker", "jitter", "wrong_color", "static")
BACKGROUND = (24, 24, 32)


@dataclass(frozen=True)
class Spec:
    color: str
    shape: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


def all_specs() -> list[Spec]:
    return [Spec(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def parse_caption(caption: str) -> Spec:
    """The inverse of ``Spec.caption``; a caption outside this world is an error naming it."""
    words = caption.strip().lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving":
        raise ValueError(f"not a toy-world caption: {caption!r} (expected 'a <color> <shape> moving <direction>')")
    spec = Spec(words[1], words[2], words[4])
    if spec.color not in COLORS or spec.shape not in SHAPES or spec.direction not in DIRECTIONS:
        raise ValueError(f"unknown colour, shape or direction in {caption!r}")
    return spec


def _mask(shape: str, cx: float, cy: float, radius: float, size: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    if shape == "square":
        return ((xs - cx).abs() <= radius) & ((ys - cy).abs() <= radius)
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2


def render(spec: Spec, frames: int = 8, size: int = 32, flaw: str | None = None, seed: int = 0) -> torch.Tensor:
    """Render ``spec`` -> uint8 ``[F, 3, size, size]``; ``flaw`` spoils it in one of ``FLAWS``."""
    if flaw is not None and flaw not in FLAWS:
        raise ValueError(f"unknown flaw {flaw!r}; flaws: {', '.join(FLAWS)}")
    g = torch.Generator().manual_seed(seed)
    radius = size * 0.14
    travel = size * 0.45
    dx, dy = DIRECTIONS[spec.direction]
    # Start so that the whole path stays in frame, with a little seeded offset across the path.
    offset = (torch.rand(2, generator=g).tolist())
    cx0 = size / 2 - dx * travel / 2 + (0 if dx else (offset[0] - 0.5) * size * 0.3)
    cy0 = size / 2 - dy * travel / 2 + (0 if dy else (offset[1] - 0.5) * size * 0.3)
    color = COLORS[spec.color]
    if flaw == "wrong_color":
        others = [c for c in COLORS if c != spec.color]
        color = COLORS[others[int(torch.randint(len(others), (1,), generator=g))]]
    video = torch.empty(frames, 3, size, size)
    for f in range(frames):
        progress = f / max(1, frames - 1) if flaw != "static" else 0.5
        cx, cy = cx0 + dx * travel * progress, cy0 + dy * travel * progress
        if flaw == "jitter":
            cx += float(torch.randn(1, generator=g)) * size * 0.08
            cy += float(torch.randn(1, generator=g)) * size * 0.08
        mask = _mask(spec.shape, cx, cy, radius, size)
        frame = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()
        frame[:, mask] = torch.tensor(color, dtype=torch.float32).view(3, 1)
        if flaw == "flicker" and f % 2 == 1:
            frame = frame * (0.45 + 0.2 * float(torch.rand(1, generator=g)))
        video[f] = frame
    return video.round().clamp(0, 255).to(torch.uint8)

