"""``subject_consistency`` (VBench): DINO ViT-B/16 features of each frame vs its predecessor and frame 0."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.scoring.base import WEIGHTS_ENV, BaseScorer, find_weights, load_state_dict, to_uint8_levels

DINO_FILE = "dino/dino_vitbase16_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def consistency_from_features(feats: torch.Tensor) -> torch.Tensor:
    """Frame features ``[B, F, D]`` -> ``[B]``: mean over i >= 1 of (max(0, cos(f_i-1, f_i)) + max(0, cos(f_0, f_i))) / 2."""
    feats = F.normalize(feats.double(), dim=-1)
    prev = (feats[:, 1:] * feats[:, :-1]).sum(-1).clamp(min=0)
    first = (feats[:, 1:] * feats[:, :1]).sum(-1).clamp(min=0)
    return ((prev + first) / 2).mean(dim=1)


def dino_preprocess(frames: torch.Tensor, resolution: int = 224) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> VBench's ``dino_transform``: short side to ``resolution``, ImageNet-normalised.

    As VBench: 8-bit levels (float), torchvision's bilinear resize without antialias (long side
    ``int(resolution * long / short)``), /255. :func:`dino_features` drops the pixels past the last
    whole patch, which DINO's stride-16 patch embedding never sees.
    """
    from torchvision.transforms import functional as TF

    x = TF.resize(to_uint8_levels(frames), resolution, antialias=False) / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def dino_position_embedding(pos_embed: torch.Tensor, rows: int, cols: int, square_image: bool = True) -> torch.Tensor:
    """DINO's position embedding for a ``rows x cols`` patch grid: ``[1, 1 + rows*cols, D]``.

    DINO (and so VBench) resizes the square grid bicubically by the scale factors
    ``(rows + 0.1) / side`` and ``(cols + 0.1) / side``; timm's resize by target size differs
    slightly, so this follows DINO. Only a square image (in pixels, before the patch cut) with the
    trained grid keeps the table as it is: DINO resamples a 224x238 image's 14x14 grid too.
    """
    side = int(math.sqrt(pos_embed.shape[1] - 1))
    if rows == side and cols == side and square_image:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    if grid.shape[-2:] != (rows, cols):
        raise ValueError(f"position grid resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)


def dino_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A timm DINO ViT's class-token features ``[N, D]`` with DINO's position-embedding interpolation."""
    h, w = images.shape[-2:]
    patch = model.patch_embed.patch_size[0]
    tokens = model.patch_embed(images[..., : h - h % patch, : w - w % patch])  # [N, rows, cols, D]
    n, rows, cols, dim = tokens.shape
    x = torch.cat([model.cls_token.expand(n, -1, -1), tokens.reshape(n, rows * cols, dim)], dim=1)
    x = model.pos_drop(x + dino_position_embedding(model.pos_embed, rows, cols, square_image=h == w))
    x = model.norm(model.blocks(model.norm_pre(x)))
    return x[:, 0]


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
        try:
            self.model.load_state_dict(load_state_dict(path, self.name))
        except RuntimeError as exc:
            raise UserError(f"{self.name}: {path} does not fit timm's {model_name}: "
                            f"{first_line(exc)}") from None
        self.model.eval().to(self.device)
        self.resolution = resolution
        self.frame_chunk = frame_chunk
        self.weights_used["dino"] = str(path)
        self.version = f"vbench-subject_consistency-2/{model_name}"  # 2: DINO's position interpolation

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        b, f = videos.shape[:2]
        frames = videos.reshape(b * f, *videos.shape[2:])
        feats = [dino_features(self.model, dino_preprocess(c, self.resolution))
                 for c in frames.split(self.frame_chunk)]
        return consistency_from_features(torch.cat(feats).reshape(b, f, -1))
