"""AMT-S, the frame interpolator behind VBench's ``motion_smoothness``, written in plain torch.

AMT ("All-Pairs Multi-Field Transforms for Efficient Frame Interpolation", Li et al., CVPR 2023)
predicts the frame at time ``t`` between two frames:

1. a context encoder turns both frames into 1/8-resolution features whose all-pairs dot products
   form a bidirectional correlation volume, pooled into a 4-level pyramid;
2. a 4-level convolutional pyramid of each frame feeds coarse-to-fine decoders (1/16 -> 1/2) that
   estimate the flows from the middle frame to both ends plus a middle-frame feature; after each
   of the three coarse decoders the flows are refined from correlations looked up around where
   they point (a single RAFT-style update step);
3. the last decoder emits several flow pairs ("multi-field") at full resolution, each with a
   blend mask and an RGB residual; both frames are warped by every pair, blended, and the
   candidates are averaged and corrected by a small convolution.

The module tree reproduces the parameter names and shapes of the released ``amt-s.pth`` (its
``state_dict`` entry), so the checkpoint loads strictly; see :func:`load_amt`. Inputs are RGB in
[0, 1] with sides that are multiples of 16; :func:`interpolate_midframes` pads and crops as VBench
does. Frames whose padded sides are below 128 px are refused: there the coarsest correlation level
is one pixel wide and the original network returns NaN.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import load_state_dict

AMT_FILE = "amt/amt-s.pth"
PAD_MULTIPLE = 16  # the coarsest decoder works at 1/16 resolution
MIN_PADDED_SIDE = 128  # 1/8 features pooled three times must keep at least 2 px
CORR_ELEMENTS_PER_BATCH = 2**27  # correlation entries per forward pass, both directions (512 MiB of float32)


# --------------------------------------------------------------------------------------------- helpers


def _bilinear_rescale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _upsample_flow(flow: torch.Tensor) -> torch.Tensor:
    """Flow at one pyramid level -> the next finer level (twice the size, vectors doubled)."""
    return 2.0 * _bilinear_rescale(flow, 2.0)


def _instance_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel normalisation without learned scale (AMT-S's context encoder)."""
    return F.instance_norm(x, eps=1e-5)


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``out(p) = image(p + flow(p))``, bilinear, edge pixels repeated; ``[B, C, H, W]``, flow ``[B, 2, H, W]``."""
    b, _, h, w = flow.shape
    base_x = torch.linspace(-1.0, 1.0, w, dtype=flow.dtype, device=flow.device).view(1, 1, w)
    base_y = torch.linspace(-1.0, 1.0, h, dtype=flow.dtype, device=flow.device).view(1, h, 1)
    grid = torch.stack(
        [(base_x + flow[:, 0] / ((w - 1.0) / 2.0)).expand(b, h, w),
         (base_y + flow[:, 1] / ((h - 1.0) / 2.0)).expand(b, h, w)],
        dim=-1,
    )
    return F.grid_sample(image, grid.to(image.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def _conv_prelu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding), nn.PReLU(c_out))


def _conv_lrelu_conv(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(hidden, c_out, 3, padding=1),
    )


# ------------------------------------------------------------------------------------ context encoder


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions with instance norm and a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        mid = c_out // 4
        self.conv1 = nn.Conv2d(c_in, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(mid, c_out, 1)
        # A one-element Sequential only to keep the checkpoint's "downsample.0" names.
        self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride)) if stride != 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for conv in (self.conv1, self.conv2, self.conv3):
            y = F.relu(_instance_norm(conv(y)))
        shortcut = x if self.downsample is None else _instance_norm(self.downsample(x))
        return F.relu(shortcut + y)


class ContextEncoder(nn.Module):
    """RGB ``[N, 3, H, W]`` -> correlation features ``[N, 84, H/8, W/8]``."""

    def __init__(self, widths: Sequence[int] = (32, 64, 96), out_dim: int = 84):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3)
        stages, c_prev = [], widths[0]
        for c, stride in zip(widths, (1, 2, 2)):
            stages.append(nn.Sequential(_Bottleneck(c_prev, c, stride), _Bottleneck(c, c, 1)))
            c_prev = c
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(c_prev, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(_instance_norm(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class FeaturePyramid(nn.Module):
    """RGB -> features at 1/2, 1/4, 1/8 and 1/16 resolution (two PReLU convolutions per level)."""

    def __init__(self, widths: Sequence[int]):
        super().__init__()
        self.depth = len(widths)
        c_prev = 3
        for level, c in enumerate(widths, start=1):
            self.add_module(f"pyramid{level}", nn.Sequential(_conv_prelu(c_prev, c, 3, 2, 1), _conv_prelu(c, c)))
            c_prev = c

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for level in range(1, self.depth + 1):
            x = getattr(self, f"pyramid{level}")(x)
            levels.append(x)
        return levels


# ---------------------------------------------------------------------------------------- decoders


class _SideChannelResBlock(nn.Module):
    """Residual block whose last ``side`` channels get an extra convolution after each main one."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.side = side
        self.conv1 = _conv_prelu(channels, channels)
        self.conv2 = _conv_prelu(side, side)
        self.conv3 = _conv_prelu(channels, channels)
        self.conv4 = _conv_prelu(side, side)
        self.conv5 = nn.Conv2d(channels, channels, 3, padding=1)
        self.prelu = nn.PReLU(channels)

    def _mix_side(self, x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
        return torch.cat([x[:, : -self.side], conv(x[:, -self.side:])], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self._mix_side(self.conv1(x), self.conv2))
        y = self.conv5(self._mix_side(y, self.conv4))
        return self.prelu(x + y)


class DecoderLevel(nn.Module):
    """Fuse one level's inputs and upsample x2: conv, side-channel residual block, transposed conv.

    The caller assembles the input channels and reads the output channels (flows first, then
    either the middle-frame feature or the multi-field masks and residuals).
    """

    def __init__(self, c_in: int, c_hidden: int, c_out: int, side: int):
        super().__init__()
        self.convblock = nn.Sequential(
            _conv_prelu(c_in, c_hidden),
            _SideChannelResBlock(c_hidden, side),
            nn.ConvTranspose2d(c_hidden, c_out, 4, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convblock(x)


# ------------------------------------------------------------------------------- correlation + update


class BidirectionalCorrelation:
    """All-pairs correlation of two 1/8 feature maps, pooled into a pyramid, looked up both ways.

    ``lookup(coords_a, coords_b)`` samples a ``(2r+1)^2`` window at every level around ``coords_a``
    (positions in frame 1 seen from each pixel of frame 0) and ``coords_b`` (positions in frame 0
    seen from each pixel of frame 1) and returns two ``[B, levels * (2r+1)^2, h, w]`` tensors.
    """

    def __init__(self, feats0: torch.Tensor, feats1: torch.Tensor, levels: int, radius: int):
        b, c, h, w = feats0.shape
        volume = torch.matmul(feats0.reshape(b, c, h * w).transpose(1, 2), feats1.reshape(b, c, h * w))
        volume = (volume / math.sqrt(c)).reshape(b, h, w, h, w)
        forward_ = volume.reshape(b * h * w, 1, h, w)  # per pixel of frame 0: its scores over frame 1
        backward_ = volume.permute(0, 3, 4, 1, 2).reshape(b * h * w, 1, h, w)  # and the other way round
        self.pyramids: tuple[list[torch.Tensor], list[torch.Tensor]] = ([forward_], [backward_])
        for pyramid in self.pyramids:
            for _ in range(levels - 1):
                pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
        span = torch.linspace(-radius, radius, 2 * radius + 1, device=feats0.device)
        # Window offsets as (dx, dy) with dx running along the window's first axis: the ordering
        # of the sampled channels that the released weights were trained with.
        side = 2 * radius + 1
        self.offsets = torch.stack(torch.meshgrid(span, span, indexing="ij"), dim=-1).view(1, side, side, 2)

    @staticmethod
    def _sample(volume: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Bilinear samples of ``volume`` ``[N, 1, H, W]`` at pixel positions ``xy`` ``[N, k, k, 2]``, zeros outside."""
        h, w = volume.shape[-2:]
        grid = torch.cat([2 * xy[..., :1] / (w - 1) - 1, 2 * xy[..., 1:] / (h - 1) - 1], dim=-1)
        return F.grid_sample(volume, grid, align_corners=True)

    def _lookup_one(self, pyramid: list[torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
        b, _, h, w = coords.shape
        centres = coords.permute(0, 2, 3, 1).reshape(b * h * w, 1, 1, 2)
        samples = [self._sample(volume, centres / 2**level + self.offsets).view(b, h, w, -1)
                   for level, volume in enumerate(pyramid)]
        return torch.cat(samples, dim=-1).permute(0, 3, 1, 2).contiguous()

    def lookup(self, coords_a: torch.Tensor, coords_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lookup_one(self.pyramids[0], coords_a), self._lookup_one(self.pyramids[1], coords_b)


class CorrelationUpdate(nn.Module):
    """One refinement step at 1/8 resolution: (feature, flow pair, correlations) -> their corrections."""

    def __init__(self, feat_dim: int, corr_channels: int, hidden: int = 76, flow_dim: int = 20,
                 corr_dim: int = 64, fused_dim: int = 68):
        super().__init__()
        self.convc1 = nn.Conv2d(corr_channels, corr_dim, 1)
        self.convf1 = nn.Conv2d(4, 2 * flow_dim, 7, padding=3)
        self.convf2 = nn.Conv2d(2 * flow_dim, flow_dim, 3, padding=1)
        self.conv = nn.Conv2d(corr_dim + flow_dim, fused_dim, 3, padding=1)
        self.gru = _conv_lrelu_conv(fused_dim + 4 + feat_dim, hidden, hidden)  # named so, but no recurrence
        self.feat_head = _conv_lrelu_conv(hidden, hidden, feat_dim)
        self.flow_head = _conv_lrelu_conv(hidden, hidden, 4)

    def forward(self, feat: torch.Tensor, flows: torch.Tensor, corr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def act(x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(x, 0.1)

        motion = torch.cat([act(self.convc1(corr)), act(self.convf2(act(self.convf1(flows))))], dim=1)
        hidden = self.gru(torch.cat([act(self.conv(motion)), flows, feat], dim=1))
        return self.feat_head(hidden), self.flow_head(hidden)


# ------------------------------------------------------------------------------------------- network


class AMTS(nn.Module):
    """The AMT-S network (VBench's configuration: radius 3, 4 correlation levels, 3 flow fields).

    ``forward(img0, img1, t)``: RGB ``[B, 3, H, W]`` in [0, 1] (H, W multiples of 16, at least 128)
    and ``t`` (a float or ``[B]``) -> the predicted frame at time t, ``[B, 3, H, W]`` in [0, 1].
    """

    def __init__(self, corr_radius: int = 3, corr_levels: int = 4, num_flows: int = 3,
                 widths: Sequence[int] = (20, 32, 44, 56), side_channels: int = 20):
        super().__init__()
        self.corr_radius, self.corr_levels, self.num_flows = corr_radius, corr_levels, num_flows
        c1, c2, c3, c4 = widths
        self.feat_encoder = ContextEncoder()
        self.encoder = FeaturePyramid(widths)
        # Coarsest level sees both 1/16 features and t; finer levels see the middle-frame feature,
        # both warped features and both flows. Outputs: 4 flow channels + the next feature, or, at
        # the finest level, num_flows x (2 + 2 flow, 1 mask, 3 residual) channels.
        self.decoder4 = DecoderLevel(2 * c4 + 1, 2 * c4, c3 + 4, side_channels)
        self.decoder3 = DecoderLevel(3 * c3 + 4, 3 * c3, c2 + 4, side_channels)
        self.decoder2 = DecoderLevel(3 * c2 + 4, 3 * c2, c1 + 4, side_channels)
        self.decoder1 = DecoderLevel(3 * c1 + 4, 3 * c1, 8 * num_flows, side_channels)
        corr_channels = 2 * corr_levels * (2 * corr_radius + 1) ** 2
        self.update4 = CorrelationUpdate(c3, corr_channels)
        self.update3 = CorrelationUpdate(c2, corr_channels)
        self.update2 = CorrelationUpdate(c1, corr_channels)
        self.comb_block = nn.Sequential(
            nn.Conv2d(3 * num_flows, 6 * num_flows, 3, padding=1),
            nn.PReLU(6 * num_flows),
            nn.Conv2d(6 * num_flows, 3, 3, padding=1),
        )

    def _refine(self, update: CorrelationUpdate, corr: BidirectionalCorrelation, grid: torch.Tensor,
                flow0: torch.Tensor, flow1: torch.Tensor, feat: torch.Tensor, t: torch.Tensor,
                factor: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Correct flows and feature of a level ``factor`` times finer than the 1/8 correlation grid."""
        small0, small1, small_feat = flow0, flow1, feat
        if factor != 1:
            small0 = (1 / factor) * _bilinear_rescale(flow0, 1 / factor)
            small1 = (1 / factor) * _bilinear_rescale(flow1, 1 / factor)
            small_feat = _bilinear_rescale(feat, 1 / factor)
        # Linear motion: the flow t -> 1 scaled by 1/t is the flow 0 -> 1, and t -> 0 by 1/(1-t) is 1 -> 0.
        corr_fwd, corr_bwd = corr.lookup(grid + small1 * (1.0 / t), grid + small0 * (1.0 / (1.0 - t)))
        d_feat, d_flow = update(small_feat, torch.cat([small0, small1], 1), torch.cat([corr_fwd, corr_bwd], 1))
        if factor != 1:
            d_feat = _bilinear_rescale(d_feat, factor)
            d_flow = factor * _bilinear_rescale(d_flow, factor)
        return flow0 + d_flow[:, :2], flow1 + d_flow[:, 2:], feat + d_feat

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
        b, _, h, w = img0.shape
        t = torch.as_tensor(t, dtype=img0.dtype, device=img0.device).reshape(-1, 1, 1, 1).expand(b, 1, 1, 1)
        mean = torch.cat([img0, img1], dim=2).mean(dim=(1, 2, 3), keepdim=True)
        x0, x1 = img0 - mean, img1 - mean

        ctx0, ctx1 = self.feat_encoder(torch.cat([x0, x1])).chunk(2)
        corr = BidirectionalCorrelation(ctx0, ctx1, self.corr_levels, self.corr_radius)
        ys, xs = torch.meshgrid(torch.arange(h // 8, device=img0.device), torch.arange(w // 8, device=img0.device),
                                indexing="ij")
        grid = torch.stack([xs, ys]).to(img0.dtype).expand(b, 2, h // 8, w // 8)
        pyr0, pyr1 = self.encoder(x0), self.encoder(x1)

        # 1/16 -> 1/8: first estimate from both coarsest features and t.
        out = self.decoder4(torch.cat([pyr0[3], pyr1[3], t.expand(b, 1, *pyr0[3].shape[-2:])], 1))
        flow0, flow1, feat = out[:, :2], out[:, 2:4], out[:, 4:]
        flow0, flow1, feat = self._refine(self.update4, corr, grid, flow0, flow1, feat, t, 1)

        # 1/8 -> 1/4 -> 1/2: residual flows on top of the upsampled ones, then a correlation update.
        for decoder, update, level, factor in ((self.decoder3, self.update3, 2, 2),
                                               (self.decoder2, self.update2, 1, 4)):
            out = decoder(torch.cat([feat, backward_warp(pyr0[level], flow0), backward_warp(pyr1[level], flow1),
                                     flow0, flow1], 1))
            flow0 = out[:, :2] + _upsample_flow(flow0)
            flow1 = out[:, 2:4] + _upsample_flow(flow1)
            flow0, flow1, feat = self._refine(update, corr, grid, flow0, flow1, out[:, 4:], t, factor)

        # 1/2 -> 1: num_flows flow pairs, blend masks and residuals.
        n = self.num_flows
        out = self.decoder1(torch.cat([feat, backward_warp(pyr0[0], flow0), backward_warp(pyr1[0], flow1),
                                       flow0, flow1], 1))
        d0, d1, mask_logits, residual = torch.split(out, [2 * n, 2 * n, n, 3 * n], dim=1)
        flows0 = (d0 + _upsample_flow(flow0).repeat(1, n, 1, 1)).reshape(b * n, 2, h, w)
        flows1 = (d1 + _upsample_flow(flow1).repeat(1, n, 1, 1)).reshape(b * n, 2, h, w)
        mask = torch.sigmoid(mask_logits).reshape(b * n, 1, h, w)
        warped0 = backward_warp(x0.repeat_interleave(n, dim=0), flows0)
        warped1 = backward_warp(x1.repeat_interleave(n, dim=0), flows1)
        candidates = (mask * warped0 + (1 - mask) * warped1 + mean.repeat_interleave(n, dim=0)
                      + residual.reshape(b * n, 3, h, w)).reshape(b, n * 3, h, w)
        merged = candidates.reshape(b, n, 3, h, w).mean(dim=1) + self.comb_block(candidates)
        return merged.clamp(0.0, 1.0)


# -------------------------------------------------------------------------------------- weights, use


def amt_shape_manifest(model: nn.Module) -> dict[str, list[int]]:
    """State-dict key -> shape, the checkpoint layout a model expects."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def load_amt(path: str | Path, device: torch.device | str = "cpu") -> AMTS:
    """AMT-S with the weights of ``path`` (``amt-s.pth``; a torch file, weights only, or safetensors).

    Raises :class:`UserError` naming the file when it cannot be read or does not hold exactly the
    AMT-S parameters (missing, unexpected or differently shaped entries).
    """
    path = Path(path)
    state = load_state_dict(path)  # unreadable files are a UserError naming the file
    model = AMTS()
    expected = amt_shape_manifest(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if list(state[k].shape) != expected[k])
    if missing or unexpected or reshaped:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = [f"{label}: {show(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped)) if keys]
        raise UserError(f"{path}: not an AMT-S checkpoint (expected VBench's amt-s.pth); " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


_LOADED: dict[tuple[str, int, int, str], AMTS] = {}


def shared_amt(path: str | Path, device: torch.device | str = "cpu") -> AMTS:
    """:func:`load_amt`, once per process for a given file (path, size, mtime) and device."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = load_amt(path, device)
    return _LOADED[key]


def pad_amounts(height: int, width: int, multiple: int = PAD_MULTIPLE) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding up to the next multiple; an odd pixel goes right / bottom."""
    ph, pw = (-height) % multiple, (-width) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def frame_size_problem(height: int, width: int) -> str | None:
    """Why AMT-S cannot take frames of this size (padded sides below :data:`MIN_PADDED_SIDE`), else None."""
    left, right, top, bottom = pad_amounts(height, width)
    if min(height + top + bottom, width + left + right) >= MIN_PADDED_SIDE:
        return None
    return (
        f"AMT-S needs frames of at least {MIN_PADDED_SIDE - PAD_MULTIPLE + 1} px per side (padded to "
        f"{MIN_PADDED_SIDE}); got {height}x{width}. Below that its coarsest correlation level is 1 px wide "
        f"and VBench's AMT-S returns NaN"
    )


def check_frame_size(height: int, width: int) -> None:
    """Raise :class:`UserError` for frames AMT-S cannot take (see :func:`frame_size_problem`)."""
    problem = frame_size_problem(height, width)
    if problem:
        raise UserError(problem)


def pairs_per_pass(height: int, width: int) -> int:
    """How many frame pairs of a padded size go through the network at once (bounded correlation memory)."""
    cells = (height // 8) * (width // 8)
    return max(1, CORR_ELEMENTS_PER_BATCH // (2 * cells * cells))


@torch.no_grad()
def interpolate_midframes(model: AMTS, first: torch.Tensor, second: torch.Tensor, t: float = 0.5,
                          max_pairs: int | None = None) -> torch.Tensor:
    """Frames halfway (at ``t``) between ``first[i]`` and ``second[i]``: float ``[N, 3, H, W]`` in [0, 1] -> same.

    The pairs are padded to multiples of 16 by repeating edge pixels (VBench's ``InputPadder``),
    run in batches of at most ``max_pairs`` (default: :func:`pairs_per_pass`), and cropped back.
    """
    if first.shape != second.shape or first.ndim != 4 or first.shape[1] != 3:
        raise ValueError(
            f"expected two [N, 3, H, W] tensors of one shape, got {tuple(first.shape)}, {tuple(second.shape)}"
        )
    h, w = first.shape[-2:]
    check_frame_size(h, w)
    left, right, top, bottom = pad_amounts(h, w)
    ph, pw = h + top + bottom, w + left + right
    param = next(model.parameters())
    step = max_pairs or pairs_per_pass(ph, pw)
    out = []
    for a, b in zip(first.split(step), second.split(step)):
        a, b = (F.pad(x.to(param.device, param.dtype), (left, right, top, bottom), mode="replicate") for x in (a, b))
        out.append(model(a, b, t)[..., top: top + h, left: left + w])
    return torch.cat(out)


def to_uint8_truncated(frames: torch.Tensor) -> np.ndarray:
    """Float ``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]``, x 255 then truncated (AMT's ``tensor2img``)."""
    return (frames * 255.0).permute(0, 2, 3, 1).cpu().numpy().clip(0, 255).astype(np.uint8)


def midframes_uint8(model: AMTS, keyframes: np.ndarray, max_pairs: int | None = None) -> np.ndarray:
    """uint8 ``[K, H, W, 3]`` key frames -> uint8 ``[K-1, H, W, 3]`` AMT-S frames between neighbours.

    As VBench's ``motion_smoothness``: frames / 255 as float32, all neighbouring pairs of the clip
    batched (in chunks), then each prediction x 255 truncated to uint8.
    """
    if keyframes.ndim != 4 or keyframes.shape[0] < 2:
        raise ValueError(f"expected at least two key frames [K, H, W, 3], got shape {keyframes.shape}")
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(keyframes)).to(device).permute(0, 3, 1, 2).float() / 255.0
    return to_uint8_truncated(interpolate_midframes(model, x[:-1], x[1:], 0.5, max_pairs))
