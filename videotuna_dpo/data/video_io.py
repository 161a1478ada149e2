"""Video files in and out through PyAV. Reads never substitute; writes are atomic."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import atomic_file


class VideoReadError(UserError):
    """A video file cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _existing(path: str | Path) -> Path:
    """``path`` as a Path, or a VideoReadError when it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "empty file (0 bytes)")
    return path


def read_video(path: str | Path) -> torch.Tensor:
    """Decode every frame of ``path`` -> uint8 ``[F, C, H, W]`` (RGB)."""
    return read_video_and_fps(path)[0]


def read_video_and_fps(path: str | Path) -> tuple[torch.Tensor, float | None]:
    """:func:`read_video` plus the stream's average frame rate (None when the file does not say)."""
    path = _existing(path)
    fps = None
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            rate = container.streams.video[0].average_rate
            fps = float(rate) if rate else None
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
    except VideoReadError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise VideoReadError(path, f"cannot decode: {exc}") from exc
    if not frames:
        raise VideoReadError(path, "no decodable frames")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoReadError(path, f"frames change size within the file: {sorted(shapes)}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(), fps


def count_frames(path: str | Path) -> int:
    """Frames in ``path``: the stream header's count, or a decode when the header does not say."""
    path = _existing(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(video=0))
    except VideoReadError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise VideoReadError(path, f"cannot decode: {exc}") from exc


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float ``[F, C, H, W]`` in [0, 1] (or uint8) -> uint8 ``[F, C, H, W]``."""
    if frames.dtype == torch.uint8:
        return frames
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def write_video(path: str | Path, frames: torch.Tensor, fps: int = 8, lossless: bool = False) -> Path:
    """Write ``[F, C, H, W]`` (uint8, or float in [0, 1]) to an mp4, atomically.

    ``lossless`` stores RGB exactly (libx264rgb, crf 0); otherwise H.264 yuv420p at crf 18.
    Odd sizes are padded by one pixel for yuv420p; lossless keeps them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W], got {tuple(frames.shape)}")
    data = to_uint8(frames).permute(0, 2, 3, 1).cpu().numpy()
    if not lossless and (data.shape[1] % 2 or data.shape[2] % 2):
        data = np.pad(data, ((0, 0), (0, data.shape[1] % 2), (0, data.shape[2] % 2), (0, 0)), mode="edge")
    with atomic_file(path, suffix=path.suffix or ".mp4") as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            codec = "libx264rgb" if lossless else "libx264"
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height = data.shape[2], data.shape[1]
            stream.pix_fmt = "rgb24" if lossless else "yuv420p"
            stream.options = {"crf": "0" if lossless else "18"}
            for image in data:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path
