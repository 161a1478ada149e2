"""Stand-in for videotuna.utils.distributions."""

import torch


class DiagonalGaussianDistribution:
    def __init__(self, parameters):
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, noise=None):
        noise = torch.randn_like(self.mean) if noise is None else noise
        return self.mean + self.std * noise

    def mode(self):
        return self.mean
