"""Preference losses for diffusion models: tensors in, tensors out, no model and no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


@dataclass
class PreferenceLossOutput:
    """The loss and the diagnostics people watch, all computed from the same tensors."""

    loss: torch.Tensor  # scalar
    inside: torch.Tensor  # [B] the implicit reward margin of each pair
    implicit_acc: torch.Tensor  # scalar, fraction of pairs with inside > 0
    reward_margin: torch.Tensor  # scalar, mean(inside)
    reward_w: torch.Tensor  # scalar, mean(-0.5 * beta * (model_err_w - ref_err_w))
    reward_l: torch.Tensor  # scalar, mean(-0.5 * beta * (model_err_l - ref_err_l))
    sft_loss: torch.Tensor  # scalar, mean(model_err_w)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every non-batch dimension: ``[B, ...] -> [B]``, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def preference_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    weights: torch.Tensor | None = None,
    sft_weight: float = 0.0,
) -> PreferenceLossOutput:
    """Diffusion-DPO and its variants on per-pair errors (each ``[B]``, MSE of prediction vs target).

    With ``inside = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))`` and
    per-pair ``weights`` w (default ones):

    - ``sigmoid`` (Diffusion-DPO): ``loss = mean(-w * logsigmoid(inside))``
    - ``hinge``:                   ``loss = mean(w * relu(1 - inside))``
    - ``ipo``: with ``h = inside / beta``, ``loss = mean(w * (h - 1 / (2 * beta)) ** 2)``

    and ``sft_weight * mean(model_err_w)`` is added (a supervised term on the winners).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    errs = [model_err_w, model_err_l, ref_err_w, ref_err_l]
    shapes = {tuple(e.shape) for e in errs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"errors must all be [B]; got shapes {[tuple(e.shape) for e in errs]}")
    model_err_w, model_err_l, ref_err_w, ref_err_l = (e.float() for e in errs)
    ref_err_w, ref_err_l = ref_err_w.detach(), ref_err_l.detach()
    if weights is None:
        weights = torch.ones_like(model_err_w)
    else:
        weights = weights.to(model_err_w).reshape(-1)
        if weights.shape != model_err_w.shape:
            raise ValueError(f"weights must be [B]={tuple(model_err_w.shape)}, got {tuple(weights.shape)}")

    model_diff = model_err_w - model_err_l
    ref_diff = ref_err_w - ref_err_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    if loss_type == "sigmoid":
        terms = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        terms = F.relu(1 - inside)
    else:
        terms = (inside / beta - 1 / (2 * beta)) ** 2
    sft_loss = model_err_w.mean()
    loss = (weights * terms).mean() + sft_weight * sft_loss

    with torch.no_grad():
        reward_w = (-0.5 * beta * (model_err_w - ref_err_w)).mean()
        reward_l = (-0.5 * beta * (model_err_l - ref_err_l)).mean()
        implicit_acc = (inside > 0).float().mean()
        reward_margin = inside.mean()
    return PreferenceLossOutput(
        loss=loss,
        inside=inside.detach(),
        implicit_acc=implicit_acc,
        reward_margin=reward_margin,
        reward_w=reward_w,
        reward_l=reward_l,
        sft_loss=sft_loss.detach(),
    )
