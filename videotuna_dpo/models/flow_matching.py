"""Flow matching as the flow-matching video models (Wan, HunyuanVideo) train: schedule, target, timesteps.

``x_t = (1 - s) x0 + s * noise`` for a noise level ``s`` in (0, 1); the model predicts the velocity
``v = noise - x0``. Training draws ``u`` (uniform or logit-normal, as diffusers'
``compute_density_for_timestep_sampling``), shifts it with the scheduler's shift
(``s = shift * u / (1 + (shift - 1) * u)``, Wan's ``flow_shift``) and feeds the transformer
``t = s * num_train_timesteps``, the value diffusers' flow schedulers give it when sampling.

``eps_hat - eps = (1 - s) (v_hat - v)``: the noise error a velocity error implies. Scaling the velocity
errors by ``(1 - s)^2`` (``dpo.beta_schedule: eps_equivalent``) makes beta mean what Diffusion-DPO's
beta means on an eps model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from videotuna_dpo.errors import UserError

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The schedulers' time shift: ``s = shift * u / (1 + (shift - 1) * u)`` (shift 1 = identity)."""
    return shift * u / (1 + (shift - 1) * u)


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class FlowMatchingSchedule:
    """Rectified-flow training schedule of one model: its shift, its ``num_train_timesteps``, the timestep draw."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    sampling: str = "uniform"  # uniform | logit_normal | mode (diffusers' weighting schemes)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    low: float = 0.0  # draws kept in [low, high) of s (one expert of two trains only its own range)
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLING:
            raise UserError(f"dpo.timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, got {self.sampling!r}")
        if not self.shift > 0:
            raise UserError(f"the flow shift must be positive, got {self.shift}")

    @classmethod
    def from_scheduler_config(cls, config: Any, **sampling: Any) -> "FlowMatchingSchedule":
        """From a diffusers flow scheduler's config: ``flow_shift`` (UniPC / DPM, Wan) or ``shift`` (FlowMatchEuler)."""
        shift = config.get("flow_shift", None) if hasattr(config, "get") else None
        if shift is None:
            shift = config.get("shift", 1.0) if hasattr(config, "get") else 1.0
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)), shift=float(shift), **sampling)

    def sample_sigmas(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``n`` shifted noise levels ``s`` in (0, 1), float32; with a range, the draw conditioned on it."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        def draw(k: int) -> torch.Tensor:
            u = compute_density_for_timestep_sampling(self.sampling, k, logit_mean=self.logit_mean,
                                                      logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                      device=device)
            return shift_sigmas(u.float(), self.shift)

        if self.low <= 0 and self.high >= 1:
            return draw(n)
        kept: list[torch.Tensor] = []
        for _ in range(1000):  # rejection: the same distribution, restricted to [low, high)
            s = draw(max(4 * n, 64))
            kept.append(s[(s >= self.low) & (s < self.high)])
            if sum(len(k) for k in kept) >= n:
                return torch.cat(kept)[:n]
        raise UserError(f"the timestep draw ({self.sampling}, shift {self.shift}) almost never falls in "
                        f"[{self.low}, {self.high}): choose another dpo.timestep_sampling")

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """The transformer's timestep input ``t = s * num_train_timesteps`` (float, ``[n]``)."""
        return self.sample_sigmas(n, device) * self.num_train_timesteps

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_train_timesteps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _expand(self.sigma(t), x0)
        return (1 - s) * x0 + s * noise

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return noise - x0

    def eps_equivalent_weight(self, t: torch.Tensor) -> torch.Tensor:
        """``(1 - s)^2`` per sample: a velocity MSE times this is the implied noise MSE."""
        return (1 - self.sigma(t)) ** 2


class FlowMatchingTraining:
    """Mixin: a backend's ``sample_timesteps`` / ``add_noise`` / ``target`` from ``self.flow_schedule``.

    ``set_timestep_sampling`` is how ``dpo.timestep_sampling`` reaches the backend; ``eps_equivalent_weight``
    is what ``dpo.beta_schedule: eps_equivalent`` multiplies the errors by.
    """

    flow_schedule: FlowMatchingSchedule

    def set_timestep_sampling(self, sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                              mode_scale: float = 1.29) -> None:
        self.flow_schedule = replace(self.flow_schedule, sampling=sampling, logit_mean=logit_mean,
                                     logit_std=logit_std, mode_scale=mode_scale)

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        return self.flow_schedule.sample_timesteps(n, device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.flow_schedule.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.flow_schedule.target(x0, noise, t)

    def eps_equivalent_weight(self, t: torch.Tensor) -> torch.Tensor:
        return self.flow_schedule.eps_equivalent_weight(t)
