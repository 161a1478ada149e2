"""The ``generate:`` block of a config: how a backend samples (``videotuna generate``, ``eval``, the training
eval callback), and the keyword arguments of the backend's ``generate`` it gives."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from videotuna_dpo.config import AT_LEAST_ONE, FINITE


@dataclass
class GenerateSchema:
    num_frames: int = 49
    steps: int = 50
    guidance: float = 6.0
    height: Optional[int] = None
    width: Optional[int] = None
    fps: int = 8
    negative_prompt: Optional[str] = None
    batch_size: int = 1
    lossless: bool = False  # exact RGB mp4 (libx264rgb, crf 0): for tiny videos, where H.264's chroma loss matters
    guidance_2: Optional[float] = None  # Wan2.2-A14B: the low-noise expert's guidance (its own default: guidance)


OPTIONAL_SAMPLER_KEYS = ("height", "width", "negative_prompt", "guidance_2")  # passed to generate only when set


def sampler_kwargs(settings: Any) -> dict[str, Any]:
    """The backend ``generate`` keyword arguments of validated ``generate:`` settings (batch size aside)."""
    kwargs = {k: settings[k] for k in ("num_frames", "steps", "guidance")}
    kwargs.update({k: settings[k] for k in OPTIONAL_SAMPLER_KEYS if settings[k] is not None})
    return kwargs


GENERATE_RULES = {"num_frames": AT_LEAST_ONE, "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "fps": AT_LEAST_ONE,
                  "guidance": FINITE, "height": AT_LEAST_ONE, "width": AT_LEAST_ONE,
                  "guidance_2": (lambda v: v is None or math.isfinite(v), "a finite number (or null)")}
