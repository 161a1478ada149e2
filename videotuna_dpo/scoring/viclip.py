"""ViCLIP (InternVid's video CLIP), the model VBench's ``overall_consistency`` uses, on open_clip blocks.

ViCLIP-L/14 is a CLIP ViT-L/14 whose patch tokens from all frames attend to each other jointly (one
class token per clip, a learned temporal position added to every frame's patches) and a CLIP text
tower limited to 32 tokens. Its released checkpoint ``ViClip-InternVid-10M-FLT.pth`` holds
``{"model": state_dict}`` with ``vision_encoder.*``, ``text_encoder.*`` and ``temp``; the modules
below carry exactly those names, so it loads strictly. The text tower is open_clip's
``TextTransformer``, the vision blocks open_clip's ``Transformer``; the tokenizer is open_clip's
bundled CLIP BPE with a 32-token context (same vocabulary, cleaning and truncation as ViCLIP's).

The architecture sizes are read off the checkpoint's tensor shapes (heads = width / 64, as in every
CLIP), so the same loader takes the released L/14 file and the small random-weight files of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import load_state_dict

HEAD_DIM = 64


@dataclass(frozen=True)
class ViCLIPConfig:
    """Sizes of a ViCLIP; the defaults are the released ViCLIP-L/14 (InternVid-10M-FLT)."""

    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1024
    vision_layers: int = 24
    num_frames: int = 8
    embed_dim: int = 768
    text_width: int = 768
    text_layers: int = 12
    context_length: int = 32
    vocab_size: int = 49408

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ViCLIPConfig":
        """Sizes read off a ViCLIP state dict's shapes."""

        def layers(prefix: str) -> int:
            ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
            return max(ids) + 1 if ids else 0

        conv = state["vision_encoder.conv1.weight"]  # [width, 3, kt, patch, patch]
        grid = round((state["vision_encoder.positional_embedding"].shape[0] - 1) ** 0.5)
        return cls(
            image_size=grid * conv.shape[-1],
            patch_size=conv.shape[-1],
            vision_width=conv.shape[0],
            vision_layers=layers("vision_encoder.transformer.resblocks."),
            num_frames=state["vision_encoder.temporal_positional_embedding"].shape[1],
            embed_dim=state["vision_encoder.proj"].shape[1],
            text_width=state["text_encoder.token_embedding.weight"].shape[1],
            text_layers=layers("text_encoder.transformer.resblocks."),
            context_length=state["text_encoder.positional_embedding"].shape[0],
            vocab_size=state["text_encoder.token_embedding.weight"].shape[0],
        )


class JointSpaceTimeViT(nn.Module):
    """ViCLIP's vision tower: frames -> patch tokens + spatial and temporal positions -> one joint sequence.

    Input ``[B, 3, T, H, W]`` normalised with CLIP's mean/std; output the projected class token ``[B, D]``.
    """

    def __init__(self, cfg: ViCLIPConfig):
        from open_clip.transformer import QuickGELU, Transformer

        super().__init__()
        width, patch = cfg.vision_width, cfg.patch_size
        self.conv1 = nn.Conv3d(3, width, (1, patch, patch), (1, patch, patch), bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((cfg.image_size // patch) ** 2 + 1, width))
        self.temporal_positional_embedding = nn.Parameter(torch.zeros(1, cfg.num_frames, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, width // HEAD_DIM, act_layer=QuickGELU,
                                       norm_layer=nn.LayerNorm, batch_first=True)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, cfg.embed_dim))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = self.conv1(video)  # [B, W, T, h, w]
        b, width, t = tokens.shape[:3]
        if t != self.temporal_positional_embedding.shape[1]:
            raise ValueError(f"ViCLIP takes {self.temporal_positional_embedding.shape[1]} frames, got {t}")
        # [B, T, h*w, W] patches; each gets its spatial position, then its frame's temporal position.
        patches = tokens.flatten(3).permute(0, 2, 3, 1) + self.positional_embedding[1:]
        patches = patches + self.temporal_positional_embedding.unsqueeze(2)
        # One sequence per clip, ordered patch-major then frame (ViCLIP's order), after one class token.
        patches = patches.transpose(1, 2).reshape(b, -1, width)
        cls = (self.class_embedding + self.positional_embedding[0]).expand(b, 1, width)
        x = self.transformer(self.ln_pre(torch.cat([cls, patches], dim=1)))
        return self.ln_post(x[:, 0]) @ self.proj


class ViCLIP(nn.Module):
    """``vision_encoder`` + ``text_encoder`` (+ the unused contrastive temperature ``temp``)."""

    def __init__(self, cfg: ViCLIPConfig = ViCLIPConfig()):
        from open_clip.transformer import QuickGELU, TextTransformer

        super().__init__()
        self.cfg = cfg
        self.vision_encoder = JointSpaceTimeViT(cfg)
        self.text_encoder = TextTransformer(
            context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
            heads=cfg.text_width // HEAD_DIM, layers=cfg.text_layers, output_dim=cfg.embed_dim,
            act_layer=QuickGELU, pool_type="argmax",
        )
        self.temp = nn.Parameter(torch.tensor(0.01))

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` CLIP-normalised frames -> L2-normalised video features ``[B, D]``."""
        return F.normalize(self.vision_encoder(frames.transpose(1, 2)).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, context_length]`` token ids -> L2-normalised text features ``[B, D]``."""
        return F.normalize(self.text_encoder(tokens).float(), dim=-1)


def viclip_tokenizer(context_length: int = 32):
    """open_clip's CLIP BPE tokenizer (bundled vocabulary) with ViCLIP's context length and truncation."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def load_viclip(path: Path, device: torch.device | str = "cpu") -> ViCLIP:
    """A ViCLIP with the weights at ``path`` (the released ``{"model": ...}`` file or a bare state dict)."""
    state = load_state_dict(Path(path))
    required = ("vision_encoder.conv1.weight", "vision_encoder.temporal_positional_embedding",
                "text_encoder.token_embedding.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise UserError(f"{path}: not a ViCLIP checkpoint (no {', '.join(missing)}); expected "
                        f"ViClip-InternVid-10M-FLT.pth from OpenGVLab/ViCLIP")
    cfg = ViCLIPConfig.from_state_dict(state)
    with torch.device("meta"):
        model = ViCLIP(cfg)
    result = model.load_state_dict(state, strict=False, assign=True)
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise UserError(f"{path}: ViCLIP weights do not match the architecture "
                        f"(missing {list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]})")
    # The text tower's causal mask is a non-persistent buffer: rebuild it off the meta device.
    model.text_encoder.attn_mask = model.text_encoder.build_causal_mask()
    return model.float().eval().to(device)


_LOADED: dict[tuple[str, str], ViCLIP] = {}


def shared_viclip(path: Path, device: torch.device | str = "cpu") -> ViCLIP:
    """:func:`load_viclip`, once per process for a given file and device."""
    key = (str(Path(path).resolve()), str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = load_viclip(path, device)
    return _LOADED[key]
