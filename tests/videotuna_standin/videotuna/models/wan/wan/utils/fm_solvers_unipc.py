"""Stand-in for Wan's ``FlowUniPCMultistepScheduler``: its constructor, ``set_timesteps(steps, device, shift=)``
(shifted sigmas from 1 down, a final 0, integer timesteps) and ``step(...)``; a first-order (Euler) update."""

import numpy as np
import torch


class FlowUniPCMultistepScheduler:
    def __init__(self, num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", shift=1.0,
                 use_dynamic_shifting=False, **kwargs):
        self.num_train_timesteps, self.shift = num_train_timesteps, shift

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, shift=None):
        shift = self.shift if shift is None else shift
        if sigmas is None:
            sigmas = np.linspace(1.0, 1.0 / self.num_train_timesteps, num_inference_steps + 1)[:-1]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = torch.from_numpy(sigmas * self.num_train_timesteps).to(device=device, dtype=torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._step_index = None

    def step(self, model_output, timestep, sample, return_dict=True, generator=None):
        if self._step_index is None:
            self._step_index = int((self.timesteps == timestep).nonzero()[0, 0])
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        prev = sample + (sigma_next - sigma).to(sample.device) * model_output.to(sample.dtype)
        self._step_index += 1
        return (prev,) if not return_dict else {"prev_sample": prev}
