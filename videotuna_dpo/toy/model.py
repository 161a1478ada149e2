"""A tiny text-to-video diffusion network for the toy world: fast enough to train on a CPU.

Pixel space (no VAE): videos ``[B, 3, F, H, W]`` in [-1, 1] are folded into 2x2 patches
``[B, 12, F, H/2, W/2]`` and denoised by a small 3D-conv UNet whose blocks are modulated (FiLM) by
the timestep and a pooled caption embedding from a word-level text encoder built from the toy
world's vocabulary. Configs are data (diffusers ``register_to_config``); the model saves and loads
itself with ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from videotuna_dpo.toy.world import COLORS, DIRECTIONS, SHAPES

VOCAB = ["<pad>", "<unk>", "a", "moving"] + list(COLORS) + list(SHAPES) + list(DIRECTIONS)
MAX_WORDS = 8


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Whitespace words -> ids ``[B, MAX_WORDS]`` (``<unk>`` for words outside the toy vocabulary)."""
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(prompts), MAX_WORDS, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().split()[:MAX_WORDS]
        ids[row, : len(words)] = torch.tensor([index.get(w, 1) for w in words], dtype=torch.long)
    return ids


class ToyTextEncoder(ModelMixin, ConfigMixin):
    """Word embeddings + one transformer layer: ids ``[B, L]`` -> token features ``[B, L, dim]``."""

    @register_to_config
    def __init__(self, vocab_size: int = len(VOCAB), dim: int = 64, max_words: int = MAX_WORDS):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_words, dim))
        self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, batch_first=True, dropout=0.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        pad = ids == 0
        # An empty caption (all padding) would make attention NaN: let it attend, then zero it out.
        x = self.layer(x, src_key_padding_mask=pad & ~pad.all(dim=1, keepdim=True))
        return torch.where(pad.unsqueeze(-1), torch.zeros_like(x), x)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FiLMBlock(nn.Module):
    """A (2+1)D residual block: spatial 1x3x3 conv, FiLM by the conditioning, temporal 3x1x1 conv."""

    def __init__(self, channels_in: int, channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.spatial = nn.Conv3d(channels_in, channels, (1, 3, 3), padding=(0, 1, 1))
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(8, channels)
        self.temporal = nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))
        self.skip = nn.Conv3d(channels_in, channels, 1) if channels_in != channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.spatial(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.temporal(F.silu(h))
        return h + self.skip(x)


class ToyVideoUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Noisy video ``[B, 3, F, H, W]``, timesteps ``[B]``, text ``[B, L, D]`` -> prediction, same shape."""

    _supports_gradient_checkpointing = True  # diffusers' enable_gradient_checkpointing: each FiLM block recomputed

    @register_to_config
    def __init__(self, channels: int = 32, text_dim: int = 64, cond_dim: int = 128, patch: int = 2):
        super().__init__()
        c_in = 3 * patch * patch
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.text_proj = nn.Linear(text_dim, cond_dim)
        self.stem = nn.Conv3d(c_in, channels, (1, 3, 3), padding=(0, 1, 1))
        self.down1 = FiLMBlock(channels, channels, cond_dim)
        self.pool = nn.Conv3d(channels, 2 * channels, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))
        self.mid1 = FiLMBlock(2 * channels, 2 * channels, cond_dim)
        self.mid2 = FiLMBlock(2 * channels, 2 * channels, cond_dim)
        self.up = nn.ConvTranspose3d(2 * channels, channels, (1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))
        self.up1 = FiLMBlock(2 * channels, channels, cond_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv3d(channels, c_in, (1, 3, 3), padding=(0, 1, 1)))
        self.gradient_checkpointing = False

    def _block(self, block: FiLMBlock, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, cond)
        return block(h, cond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.config.patch
        b, c, f, h, w = x.shape
        # [B, 3, F, H, W] -> [B, 3*p*p, F, H/p, W/p]
        z = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)
        if text_mask is None:
            pooled = text.mean(dim=1)
        else:
            m = text_mask.float()[..., None]
            pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)
        cond = self.time_mlp(timestep_embedding(t, self.config.cond_dim)) + self.text_proj(pooled)
        h0 = self._block(self.down1, self.stem(z), cond)
        h1 = self._block(self.mid2, self._block(self.mid1, self.pool(h0), cond), cond)
        y = self.out(self._block(self.up1, torch.cat([self.up(h1), h0], dim=1), cond))
        return y.reshape(b, c, p, p, f, h // p, w // p).permute(0, 1, 4, 5, 2, 6, 3).reshape(b, c, f, h, w)
