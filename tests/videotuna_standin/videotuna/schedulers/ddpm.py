"""Stand-in for videotuna.schedulers.ddpm: LDM's linear (sqrt-spaced) beta schedule, q_sample, get_v."""

import numpy as np
import torch


def extract_into_tensor(a, t, x_shape):
    out = a.to(device=t.device).gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class DDPM:
    def __init__(self, timesteps=1000, beta_schedule="linear", linear_start=1e-4, linear_end=2e-2,
                 learn_logvar=False, logvar_init=0.0, parameterization="eps", **kwargs):
        betas = np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.num_timesteps = int(timesteps)
        self.parameterization = parameterization
        self.learn_logvar = learn_logvar
        to_torch = lambda x: torch.tensor(x, dtype=torch.float32)
        self.betas = to_torch(betas)
        self.alphas_cumprod = to_torch(alphas_cumprod)
        self.alphas_cumprod_prev = to_torch(np.append(1.0, alphas_cumprod[:-1]))
        self.sqrt_alphas_cumprod = to_torch(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = to_torch(np.sqrt(1.0 - alphas_cumprod))
        self.logvar = torch.full((self.num_timesteps,), logvar_init)

    def q_sample(self, x_start, t, noise=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x, noise, t):
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)


class LDDPM(DDPM):
    pass
