"""Stand-in for VideoTuna's VC2 UNetModel: same constructor names, embeddings and [B, C, T, H, W] layout, tiny body."""

import math

import torch
from torch import nn


def checkpoint(func, inputs, flag):
    """The host's lvdm ``checkpoint``: recompute ``func`` in the backward pass when ``flag`` (non-reentrant)."""
    return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False) if flag else func(*inputs)


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNormSpecific(nn.GroupNorm):
    """The host's ``normalization`` layer (lvdm ``GroupNormSpecific``): normalises ``x.float()``, returns ``x``'s dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class CrossAttention(nn.Module):
    """Stands in for the host's BasicTransformerBlock, whose switch is ``checkpoint``."""

    def __init__(self, query_dim, context_dim, heads=2, dim_head=8, checkpoint=False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.checkpoint = checkpoint
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context):
        return checkpoint(self._forward, (x, context), self.checkpoint)

    def _forward(self, x, context):
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Resblock with the time embedding, spatial cross-attention, temporal conv (one per UNet level)."""

    def __init__(self, ch, emb_dim, context_dim, use_checkpoint=False):
        super().__init__()
        self.use_checkpoint = use_checkpoint  # the host's ResBlock switch
        self.in_layers = nn.Sequential(GroupNormSpecific(4, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, ch))
        self.attn = CrossAttention(ch, context_dim, checkpoint=use_checkpoint)
        # VC2's temporal conv block has a fixed dropout of 0.1 before its convolutions.
        self.temporal = nn.Sequential(GroupNormSpecific(4, ch), nn.SiLU(), nn.Dropout(0.1),
                                      nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0)))

    def forward(self, h, emb, context, b):
        return checkpoint(self._forward, (h, emb, context, b), self.use_checkpoint)

    def _forward(self, h, emb, context, b):
        h = h + self.in_layers(h) + self.emb_layers(emb)[:, :, None, None]
        bt, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        h = h + self.attn(tokens, context).transpose(1, 2).reshape(bt, c, hh, ww)
        video = h.reshape(b, bt // b, c, hh, ww).permute(0, 2, 1, 3, 4)
        video = video + self.temporal(video)
        return video.permute(0, 2, 1, 3, 4).reshape(bt, c, hh, ww)


class TimestepEmbedSequential(nn.Sequential):
    """The host's container of each input, middle and output block (what FSDP wraps one by one): the time
    embedding and context go to the layers that take them."""

    def forward(self, h, emb, context, b):
        for layer in self:
            h = layer(h, emb, context, b) if isinstance(layer, Block) else layer(h)
        return h


class UNetModel(nn.Module):
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks=1, attention_resolutions=(),
                 channel_mult=(1,), context_dim=None, temporal_length=16, fps_cond=False, use_fp16=False,
                 use_checkpoint=False, **kwargs):
        super().__init__()
        self.model_channels = model_channels
        self.temporal_length = temporal_length
        self.fps_cond = fps_cond
        self.dtype = torch.float16 if use_fp16 else torch.float32
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if fps_cond:
            self.fps_embedding = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        self.middle_block = nn.ModuleList([TimestepEmbedSequential(Block(model_channels, emb_dim, context_dim, use_checkpoint))
                                           for _ in range(len(channel_mult))])
        self.out = nn.Sequential(GroupNormSpecific(4, model_channels), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, features_adapter=None, fps=16, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.fps_cond:
            if type(fps) == int:
                fps = torch.full_like(timesteps, fps)
            emb = emb + self.fps_embedding(timestep_embedding(fps, self.model_channels))
        b, _, t, _, _ = x.shape
        context = context.repeat_interleave(repeats=t, dim=0)
        emb = emb.repeat_interleave(repeats=t, dim=0)
        h = x.permute(0, 2, 1, 3, 4).reshape(b * t, *x.shape[1:2], *x.shape[3:]).type(self.dtype)
        h = self.input_blocks[0](h, emb, context, b)
        for block in self.middle_block:
            h = block(h, emb, context, b)
        y = self.out(h).type(x.dtype)
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
