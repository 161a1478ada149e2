"""Frame sampling and spatial preprocessing shared by training, caching and scoring."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from videotuna_dpo.errors import UserError


def frame_span(video_length: int, frame_stride: int) -> int:
    """Frames a clip of ``video_length`` frames at ``frame_stride`` covers."""
    return (video_length - 1) * frame_stride + 1


def frame_indices(video_length: int, frame_stride: int, start: int) -> list[int]:
    """Indices ``start, start + stride, ...``; the caller checks the clip is long enough."""
    return [start + i * frame_stride for i in range(video_length)]


def fit_stride(num_frames: int, video_length: int, frame_stride: int, path: str) -> int:
    """The largest stride <= ``frame_stride`` at which ``video_length`` frames fit in ``num_frames``.

    The official loader falls back to stride 1 when a clip is too short for its stride; this keeps as
    much of the requested temporal span as fits. Fewer than ``video_length`` frames is an error.
    """
    if num_frames < video_length:
        raise UserError(f"{path}: {num_frames} frames, but data.video_length={video_length} needs at least "
                        f"{video_length}")
    return next(s for s in range(frame_stride, 0, -1) if frame_span(video_length, s) <= num_frames)


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 or float ``[F, C, h, w]`` -> float ``[F, C, height, width]``: cover-resize then center crop."""
    x = frames.float()
    _, _, h, w = x.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return x[:, :, top : top + height, left : left + width]


def to_model_range(frames_uint8_scale: torch.Tensor) -> torch.Tensor:
    """Pixel values on 0..255 -> [-1, 1]."""
    return (frames_uint8_scale / 127.5 - 1.0).clamp(-1, 1)
