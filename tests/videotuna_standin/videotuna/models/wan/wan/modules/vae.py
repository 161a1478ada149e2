"""Stand-in for Wan2.1's causal video VAE: ``WanVAE_`` (the module; ``encode(x, scale)`` returns the
normalised posterior mean only, 1 + (T - 1) / 4 latent frames, 8x spatial) and ``WanVAE`` (the wrapper
with the per-channel latent statistics, lists of videos in and out, weights from a .pth)."""

import torch
from torch import nn


class WanVAE_(nn.Module):
    def __init__(self, dim=128, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[True, True, False], dropout=0.0):
        super().__init__()
        self.z_dim = z_dim
        self.t_down = 2 ** sum(bool(d) for d in temperal_downsample)
        s = 2 ** (len(dim_mult) - 1)
        kernel = (self.t_down, s, s)
        self.encoder = nn.Sequential(nn.Conv3d(3, dim, kernel, stride=kernel), nn.SiLU(), nn.Dropout(dropout),
                                     nn.Conv3d(dim, z_dim * 2, 1))
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = nn.Sequential(nn.ConvTranspose3d(z_dim, dim, kernel, stride=kernel), nn.SiLU(),
                                     nn.Conv3d(dim, 3, 1))

    def encode(self, x, scale):
        # causal: the first frame alone is the first latent frame, then one per 4 frames
        x = torch.cat([x[:, :, :1].repeat(1, 1, self.t_down - 1, 1, 1), x], dim=2)
        mu, _log_var = self.conv1(self.encoder(x)).chunk(2, dim=1)
        return (mu - scale[0].view(1, self.z_dim, 1, 1, 1)) * scale[1].view(1, self.z_dim, 1, 1, 1)

    def decode(self, z, scale):
        z = z / scale[1].view(1, self.z_dim, 1, 1, 1) + scale[0].view(1, self.z_dim, 1, 1, 1)
        return self.decoder(self.conv2(z))[:, :, self.t_down - 1:]

    def clear_cache(self):
        pass


class WanVAE:
    def __init__(self, vae=None, vae_pth="cache/vae_step_411000.pth", dtype=torch.float, device="cuda"):
        self.dtype, self.device = dtype, device
        # per-channel latent statistics (the stand-in's own values; the real VAE ships its measured ones)
        self.mean = torch.linspace(-0.5, 0.5, vae.z_dim, dtype=dtype, device=device)
        self.std = torch.linspace(1.0, 2.0, vae.z_dim, dtype=dtype, device=device)
        self.scale = [self.mean, 1.0 / self.std]
        self.model = vae.to(dtype)
        self.vae_pth = vae_pth

    def encode(self, videos):
        """videos: list of ``[C, T, H, W]`` -> list of ``[z_dim, 1 + (T - 1) / 4, H / 8, W / 8]``."""
        return [self.model.encode(u.unsqueeze(0), self.scale).float().squeeze(0) for u in videos]

    def decode(self, zs):
        return [self.model.decode(u.unsqueeze(0), self.scale).float().clamp_(-1, 1).squeeze(0) for u in zs]

    def load_weight(self):
        self.model.load_state_dict(torch.load(self.vae_pth, map_location=self.device), assign=True)
        self.model = self.model.to(self.device).to(self.dtype)
