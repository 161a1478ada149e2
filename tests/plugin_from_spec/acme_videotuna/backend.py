"""A pixel-space eps-prediction backend: the latents are the videos, the denoiser a 1x1x1 convolution."""

import copy
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class PixelBackend(nn.Module):
    def __init__(self, init_std, trainable_weights=None):
        super().__init__()
        self.net = nn.Conv3d(3, 3, kernel_size=1)
        with torch.no_grad():
            torch.manual_seed(0)
            self.net.weight.normal_(0.0, init_std)
            self.net.bias.zero_()
        self.frozen = copy.deepcopy(self.net).requires_grad_(False)
        if trainable_weights:
            self.load_trainable(trainable_weights)

    @classmethod
    def from_config(cls, model_cfg):
        return cls(float(model_cfg.get("init_std", 0.1)), model_cfg.get("trainable_weights"))

    def encode_video(self, pixels):
        return pixels.float()

    def encode_prompt(self, prompts):
        return torch.tensor([[len(p) / 100.0] for p in prompts], device=self.net.weight.device)

    def sample_timesteps(self, n, device):
        return torch.randint(1, 1000, (n,), device=device)

    def _alpha(self, t):
        return torch.cos(t.float() / 1000 * math.pi / 2).reshape(-1, 1, 1, 1, 1) ** 2

    def add_noise(self, x0, noise, t):
        a = self._alpha(t)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, t):
        return noise

    def _predict(self, net, noisy, t, cond):
        return net(noisy) + cond.reshape(-1, 1, 1, 1, 1)

    def predict(self, noisy, t, cond):
        return self._predict(self.net, noisy, t, cond)

    @contextmanager
    def reference(self):
        yield lambda noisy, t, cond: self._predict(self.frozen, noisy, t, cond)

    def trainable_parameters(self):
        return list(self.net.parameters())

    def save_trainable(self, directory):
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                  str(tmp / "acme.safetensors"))
        (tmp / "trainable.json").write_text(json.dumps({"family": "acme_pixels"}))
        if directory.exists():
            for f in directory.iterdir():
                f.unlink()
            directory.rmdir()
        os.replace(tmp, directory)
        return directory

    def load_trainable(self, directory):
        self.net.load_state_dict(load_file(str(Path(directory) / "acme.safetensors")))

    @torch.no_grad()
    def generate(self, prompts, num_frames, steps, guidance, seed, height=8, width=8, **unused):
        videos = []
        for prompt, s in zip(prompts, seed):
            g = torch.Generator().manual_seed(int(s))
            x = torch.randn(1, 3, num_frames, height, width, generator=g).to(self.net.weight.device)
            for _ in range(steps):
                x = x - 0.1 * self.net(x)
            videos.append(torch.sigmoid(x)[0].permute(1, 0, 2, 3))  # [F, C, H, W]
        return torch.stack(videos)  # [B, F, C, H, W] in [0, 1]
