"""Stand-in for Wan's ``WanT2V`` as VideoTuna builds it: the flow's VAE, umT5 and WanModel wrapped with the
task config (``text_len``, ``vae_stride``, ``patch_size``, ``num_train_timesteps``, negative prompt); the
T5 and VAE weights load from the checkpoint folder in ``load_weight``. The real one pins ``cuda:<device_id>``;
the stand-in falls back to the CPU when there is no GPU."""

import math
import os

import torch

from .modules.t5 import T5EncoderModel
from .modules.vae import WanVAE


class WanT2V:
    def __init__(self, config, checkpoint_dir, device_id=0, rank=0, t5_fsdp=False, dit_fsdp=False, use_usp=False,
                 t5_cpu=False, first_stage_model=None, cond_stage_model=None, denoiser=None):
        self.device = torch.device(f"cuda:{device_id}" if torch.cuda.is_available() else "cpu")
        self.config, self.rank, self.t5_cpu = config, rank, t5_cpu
        self.use_usp = use_usp
        self.num_train_timesteps = config.num_train_timesteps
        self.param_dtype = config.param_dtype
        self.text_encoder = T5EncoderModel(text_len=config.text_len, dtype=config.t5_dtype, device=torch.device("cpu"),
                                           checkpoint_path=os.path.join(checkpoint_dir, config.t5_checkpoint),
                                           tokenizer_path=os.path.join(checkpoint_dir, config.t5_tokenizer),
                                           model=cond_stage_model)
        self.vae = WanVAE(vae=first_stage_model, vae_pth=os.path.join(checkpoint_dir, config.vae_checkpoint),
                          device=self.device)
        self.vae_stride, self.patch_size = config.vae_stride, config.patch_size
        self.model = denoiser
        self.sample_neg_prompt = config.sample_neg_prompt

    def load_weight(self):
        self.text_encoder.load_weight()
        self.vae.load_weight()
        self.sp_size = 1
        self.model = self.model.to(self.device)

    def get_seq_len(self, frames=81, width=1280, height=720):
        shape = ((frames - 1) // self.vae_stride[0] + 1, height // self.vae_stride[1], width // self.vae_stride[2])
        return math.ceil(shape[1] * shape[2] / (self.patch_size[1] * self.patch_size[2]) * shape[0] / self.sp_size) \
            * self.sp_size
