"""``subject_consistency`` (VBench): DINO ViT-B/16 features of each frame vs its predecessor and frame 0."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from videotuna_dpo.scoring.base import WEIGHTS_ENV, BaseScorer, find_weights, load_state_dict

DINO_FILE = "dino/dino_vitbase16_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def consistency_from_features(feats: torch.Tensor) -> torch.Tensor:
    """Frame features ``[B, F, D]`` -> ``[B]``: mean over i >= 1 of (max(0, cos(f_i-1, f_i)) + max(0, cos(f_0, f_i))) / 2."""
    feats = F.normalize(feats.double(), dim=-1)
    prev = (feats[:, 1:] * feats[:, :-1]).sum(-1).clamp(min=0)
    first = (feats[:, 1:] * feats[:, :1]).sum(-1).clamp(min=0)
    return ((prev + first) / 2).mean(dim=1)


def dino_preprocess(frames: torch.Tensor, resolution: int = 224, patch: int = 16) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> short side resized to ``resolution``, ImageNet-normalised.

    Sides are then cut down to multiples of the patch size, the pixels a stride-16 patch embedding ignores.
    """
    h, w = frames.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(patch, round(h * scale)), max(patch, round(w * scale)))
    x = F.interpolate(frames, size=size, mode="bilinear", align_corners=False, antialias=False)
    x = x[..., : size[0] - size[0] % patch, : size[1] - size[1] % patch]
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class SubjectConsistency(BaseScorer):
    """DINO frame-feature consistency; the model is a timm ViT loaded from a local checkpoint."""

    name = "subject_consistency"
    kind = "quality"
    needs_weights = True
    weights_hint = f"weights or ${WEIGHTS_ENV}/{DINO_FILE}"
    min_frames = 2

    def __init__(self, device: str | None = None, weights: str | None = None,
                 model_name: str = "vit_base_patch16_224.dino", resolution: int = 224, frame_chunk: int = 32):
        super().__init__(device)
        import timm

        path = find_weights(
            self.name, weights, DINO_FILE,
            "the DINO ViT-B/16 checkpoint (dino_vitbase16_pretrain.pth of facebookresearch/dino, "
            "or timm's vit_base_patch16_224.dino model.safetensors)", "weights",
        )
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
        self.model.load_state_dict(load_state_dict(path))
        self.model.eval().to(self.device)
        self.patch = self.model.patch_embed.patch_size[0]
        self.resolution = resolution
        self.frame_chunk = frame_chunk
        self.weights_used["dino"] = str(path)
        self.version = f"vbench-subject_consistency-1/{model_name}"

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        frames = videos.reshape(b * f, *videos.shape[2:])
        feats = [self.model(dino_preprocess(c, self.resolution, self.patch)) for c in frames.split(self.frame_chunk)]
        return consistency_from_features(torch.cat(feats).reshape(b, f, -1))
