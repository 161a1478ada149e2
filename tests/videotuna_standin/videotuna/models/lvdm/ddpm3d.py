"""Stand-in for videotuna.models.lvdm.ddpm3d.DiffusionWrapper (crossattn conditioning)."""

import pytorch_lightning as pl
import torch


class DiffusionWrapper(pl.LightningModule):
    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.diffusion_model = diff_model_config
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, **kwargs):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1), **kwargs)
