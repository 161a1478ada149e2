"""CLIP-based dimensions through open_clip: ``aesthetic_quality`` and ``overall_consistency``.

Both load one local CLIP checkpoint (OpenAI ViT-L/14 by default) and share the loaded model.
``overall_consistency`` is VBench's text-video similarity with CLIP frame features averaged over
8 frames in place of ViCLIP (ViCLIP is not included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from videotuna_dpo.scoring.base import WEIGHTS_ENV, BaseScorer, find_weights, load_state_dict

CLIP_FILE = "clip/ViT-L-14.pt"
AESTHETIC_FILE = "aesthetic/sa_0_4_vit_l_14_linear.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_WHAT = "the CLIP ViT-L/14 checkpoint (OpenAI's ViT-L-14.pt, or an open_clip state dict of the same model)"

_LOADED: dict[tuple[str, str, str], torch.nn.Module] = {}


def load_clip(model_name: str, path: Path, device: torch.device) -> torch.nn.Module:
    """An open_clip model built from ``model_name`` with the weights at ``path``; loaded once per process."""
    import open_clip

    key = (model_name, str(path), str(device))
    if key not in _LOADED:
        model = open_clip.create_model(model_name, pretrained=None)
        open_clip.load_checkpoint(model, str(path), weights_only=False)
        _LOADED[key] = model.eval().to(device)
    return _LOADED[key]


def clip_preprocess(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, 3, size, size]``: bicubic short side, centre crop, CLIP-normalised."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(frames, size=(rh, rw), mode="bicubic", align_corners=False, antialias=False)
    top, left = (rh - size) // 2, (rw - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def middle_frame_indices(num_samples: int, num_frames: int) -> list[int]:
    """VBench's "middle" sampling: split into ``num_samples`` equal spans, take each span's middle frame."""
    n = min(num_samples, num_frames)
    bounds = [int(i * num_frames / n) for i in range(n + 1)]
    return [(bounds[i] + bounds[i + 1] - 1) // 2 for i in range(n)]


class _ClipScorer(BaseScorer):
    needs_weights = True

    def __init__(self, device: str | None, clip_weights: str | None, model_name: str, frame_chunk: int):
        super().__init__(device)
        path = find_weights(self.name, clip_weights, CLIP_FILE, CLIP_WHAT, "clip_weights")
        self.model = load_clip(model_name, path, self.device)
        self.image_size = self.model.visual.image_size
        self.image_size = self.image_size[0] if isinstance(self.image_size, (tuple, list)) else self.image_size
        self.model_name = model_name
        self.frame_chunk = frame_chunk
        self.weights_used["clip"] = str(path)

    def image_features(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> L2-normalised CLIP image features ``[N, D]``."""
        feats = [self.model.encode_image(clip_preprocess(c, self.image_size)).float()
                 for c in frames.split(self.frame_chunk)]
        return F.normalize(torch.cat(feats), dim=-1)


class AestheticQuality(_ClipScorer):
    """LAION aesthetic predictor (linear head on CLIP image features) / 10, averaged over frames."""

    name = "aesthetic_quality"
    kind = "quality"
    weights_hint = f"clip_weights / head_weights or ${WEIGHTS_ENV}/{CLIP_FILE} and ${WEIGHTS_ENV}/{AESTHETIC_FILE}"

    def __init__(self, device: str | None = None, clip_weights: str | None = None, head_weights: str | None = None,
                 model_name: str = "ViT-L-14-quickgelu", frame_chunk: int = 32):
        head_path = find_weights(
            self.name, head_weights, AESTHETIC_FILE,
            "the LAION aesthetic predictor head sa_0_4_vit_l_14_linear.pth (LAION-AI/aesthetic-predictor)",
            "head_weights",
        )
        super().__init__(device, clip_weights, model_name, frame_chunk)
        state = load_state_dict(head_path)
        self.head = torch.nn.Linear(state["weight"].shape[1], 1)
        self.head.load_state_dict(state)
        self.head.eval().to(self.device)
        self.weights_used["aesthetic_head"] = str(head_path)
        self.version = f"vbench-aesthetic_quality-1/{model_name}+laion-linear"

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        feats = self.image_features(videos.reshape(b * f, *videos.shape[2:]))
        return (self.head(feats).reshape(b, f).double() / 10.0).mean(dim=1)


class OverallConsistency(_ClipScorer):
    """Cosine similarity of the prompt's CLIP text feature and the mean CLIP feature of 8 frames."""

    name = "overall_consistency"
    kind = "semantic"
    weights_hint = f"clip_weights or ${WEIGHTS_ENV}/{CLIP_FILE}"

    def __init__(self, device: str | None = None, clip_weights: str | None = None,
                 model_name: str = "ViT-L-14-quickgelu", num_frames: int = 8, frame_chunk: int = 32):
        import open_clip

        super().__init__(device, clip_weights, model_name, frame_chunk)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.num_frames = num_frames
        self.version = f"overall_consistency-clip-1/{model_name}"

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        idx = middle_frame_indices(self.num_frames, videos.shape[1])
        b, n = videos.shape[0], len(idx)
        frames = videos[:, idx].reshape(b * n, *videos.shape[2:])
        video_feats = F.normalize(self.image_features(frames).reshape(b, n, -1).mean(dim=1), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (video_feats * text).sum(-1).double()
