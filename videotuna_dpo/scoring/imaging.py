"""``imaging_quality``: MUSIQ (SPAQ) / 100 per frame as in VBench, or a no-weights NIQE proxy.

Backends: ``musiq`` needs the pyiqa package and a local checkpoint; ``niqe`` needs no weights and
maps NIQE to (0, 1] as ``10 / (10 + NIQE)`` (1 = natural, 0.5 at NIQE 10; natural footage with
NIQE 3..6 lands near VBench's usual MUSIQ range). ``auto`` uses MUSIQ when its checkpoint is found.
"""

from __future__ import annotations

from typing import Sequence

import torch

from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.scoring.base import (
    WEIGHTS_ENV,
    BaseScorer,
    MissingWeightsError,
    find_weights,
    load_state_dict,
    pick_backend,
    reject_unused,
    to_uint8_levels,
)
from videotuna_dpo.scoring.niqe import fit_for_niqe, luminance, niqe, pristine_model

MUSIQ_FILE = "musiq/musiq_spaq_ckpt-358bb6af.pth"
BACKENDS = ("auto", "musiq", "niqe")


def niqe_to_quality(values: torch.Tensor) -> torch.Tensor:
    """NIQE ``[N]`` (lower is better) -> quality ``[N]`` in (0, 1]: 10 / (10 + NIQE)."""
    return 10.0 / (10.0 + values)


def cap_longer_side(frames: torch.Tensor, cap: int = 512) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] -> frames whose longer side is at most ``cap``, as VBench's ``transform``.

    VBench ('longer' mode) resizes the frames it read (float, on 0..255) to ``int(scale*h) x int(scale*w)``
    with torchvision's bilinear resize without antialiasing, then divides by 255.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = to_uint8_levels(frames)
    h, w = x.shape[-2:]
    if max(h, w) > cap:
        scale = cap / max(h, w)
        x = TF.resize(x, [int(scale * h), int(scale * w)], interpolation=InterpolationMode.BILINEAR,
                      antialias=False)
    return x / 255.0


class ImagingQuality(BaseScorer):
    """Per-frame technical quality averaged over frames, in [0, 1]."""

    name = "imaging_quality"
    kind = "quality"

    def __init__(self, device: str | None = None, backend: str = "auto", musiq_weights: str | None = None,
                 frame_chunk: int = 32):
        super().__init__(device)
        backend = pick_backend(self.name, "backend", backend, BACKENDS, musiq_weights, MUSIQ_FILE, "musiq", "niqe")
        if backend == "niqe":
            reject_unused(self.name, backend, musiq_weights=(musiq_weights, None))
        self.backend = backend
        self.frame_chunk = frame_chunk
        if backend == "musiq":
            self._load_musiq(musiq_weights)
        else:
            self.weights_used["niqe_params"] = str(pristine_model()[2])
            self.version = "imaging_quality-niqe-proxy-1"

    def _load_musiq(self, musiq_weights: str | None) -> None:
        self.needs_weights = True
        self.weights_hint = f"musiq_weights or ${WEIGHTS_ENV}/{MUSIQ_FILE}"
        path = find_weights(self.name, musiq_weights, MUSIQ_FILE, "pyiqa's MUSIQ SPAQ checkpoint", "musiq_weights")
        try:
            from pyiqa.archs.musiq_arch import MUSIQ
        except ImportError as exc:
            raise MissingWeightsError(
                f"{self.name}: backend 'musiq' runs through the pyiqa package, which is not importable "
                f"({exc}); `pip install pyiqa`, or use backend='niqe'"
            ) from exc
        # pyiqa's own loader unpickles (weights_only=False); read the tensors safely and load strictly.
        model = MUSIQ(pretrained=False)
        try:
            model.load_state_dict(load_state_dict(path, self.name), strict=True)
        except RuntimeError as exc:
            raise UserError(f"{self.name}: {path} is not a MUSIQ (SPAQ) checkpoint for pyiqa's MUSIQ: "
                            f"{first_line(exc)}") from None
        self._musiq = model.eval().to(self.device)
        self.weights_used["musiq"] = str(path)
        self.version = "vbench-imaging_quality-2/musiq-spaq"  # 2: VBench's resize

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        frames = videos.reshape(b * f, *videos.shape[2:])
        per_frame = []
        for chunk in frames.split(self.frame_chunk):
            if self.backend == "musiq":
                per_frame.append(self._musiq(cap_longer_side(chunk)).reshape(-1).double() / 100.0)
            else:
                per_frame.append(niqe_to_quality(niqe(luminance(fit_for_niqe(chunk.double())))))
        return torch.cat(per_frame).reshape(b, f).mean(dim=1)
