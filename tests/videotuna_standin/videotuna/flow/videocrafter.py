"""Stand-in for videotuna.flow.videocrafter.VideocrafterFlow: VC2's names, scaling, layouts and losses."""

import numpy as np
import torch

from videotuna.base.generation_base import GenerationBase
from videotuna.models.lvdm.ddpm3d import DiffusionWrapper
from videotuna.utils.distributions import DiagonalGaussianDistribution


def extract_into_tensor(a, t, x_shape):
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


class VideocrafterFlow(GenerationBase):
    def __init__(self, first_stage_config, cond_stage_config, denoiser_config, scheduler_config=None,
                 cond_stage_2_config=None, lora_config=None, parameterization="eps", conditioning_key=None,
                 first_stage_key="video", cond_stage_key="caption", image_size=256, channels=4,
                 scale_factor=1.0, encoder_type="2d", use_scale=False, scale_a=1, scale_b=0.3, mid_step=400,
                 fix_scale_bug=False, uncond_prob=0.2, uncond_type="empty_seq", *args, **kwargs):
        super().__init__(first_stage_config=first_stage_config, cond_stage_config=cond_stage_config,
                         cond_stage_2_config=cond_stage_2_config, denoiser_config=denoiser_config,
                         scheduler_config=scheduler_config, lora_config=lora_config)
        self.parameterization = parameterization
        self.first_stage_key, self.cond_stage_key = first_stage_key, cond_stage_key
        self.channels = channels
        self.temporal_length = denoiser_config["params"].get("temporal_length", 16)
        self.image_size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        self.model = DiffusionWrapper(self.denoiser, conditioning_key)
        self.num_timesteps = self.scheduler.num_timesteps
        self.scale_factor = scale_factor
        self.encoder_type = encoder_type
        self.uncond_prob, self.uncond_type = uncond_prob, uncond_type
        self.use_scale = use_scale
        if use_scale:
            scale_step = self.num_timesteps - mid_step if fix_scale_bug else self.num_timesteps
            scale_arr = np.concatenate((np.linspace(scale_a, scale_b, mid_step), np.full(scale_step, scale_b)))
            self.register_buffer("scale_arr", torch.tensor(scale_arr, dtype=torch.float32))

    def get_learned_conditioning(self, c):
        return self.cond_stage_model.encode(c)

    def get_first_stage_encoding(self, encoder_posterior, noise=None):
        z = encoder_posterior.sample(noise=noise) if isinstance(encoder_posterior, DiagonalGaussianDistribution) else encoder_posterior
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x):
        return torch.cat([self.get_first_stage_encoding(self.first_stage_model.encode(x[:, :, i])).unsqueeze(2)
                          for i in range(x.shape[2])], dim=2)

    @torch.no_grad()
    def decode_first_stage(self, z, **kwargs):
        z = z / self.scale_factor
        return torch.cat([self.first_stage_model.decode(z[:, :, i]).unsqueeze(2) for i in range(z.shape[2])], dim=2)

    def get_batch_input(self, batch, random_uncond, return_first_stage_outputs=False, return_original_cond=False,
                        is_imgbatch=False):
        x = batch[self.first_stage_key].float()
        z = self.encode_first_stage(x)
        cond = batch[self.cond_stage_key]
        return [z, self.get_learned_conditioning(cond)]

    def forward(self, x, c, **kwargs):
        t = kwargs.pop("t") if "t" in kwargs else torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device)
        if self.use_scale:
            x = x * extract_into_tensor(self.scale_arr, t, x.shape)
        return self.p_losses(x, c, t, **kwargs)

    def apply_model(self, x_noisy, t, cond, **kwargs):
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        out = self.model(x_noisy, t, **cond, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def p_losses(self, x_start, cond, t, noise=None, **kwargs):
        noise = torch.randn_like(x_start) if noise is None else noise
        x_noisy = self.scheduler.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x_start
        else:
            target = self.scheduler.get_v(x_start, noise, t)
        loss = torch.nn.functional.mse_loss(target, model_output, reduction="none").mean([1, 2, 3, 4]).mean()
        return loss, {"train/loss": loss}

    def sample_batch_t2v(self, prompts, fps, noise_shape=None, n_samples_prompt=1, ddim_steps=50, ddim_eta=1.0,
                         cfg_scale=1.0, temporal_cfg_scale=None, uncond_prompt="", **kwargs):
        batch_size = noise_shape[0]
        fps = torch.tensor([fps] * batch_size).to(self.device).long()
        cond = {"c_crossattn": [self.get_learned_conditioning(prompts)], "fps": fps}
        uncond = None
        if cfg_scale != 1.0:
            uncond = {"c_crossattn": [self.get_learned_conditioning(batch_size * [uncond_prompt])], "fps": fps}
        samples = []
        for _ in range(n_samples_prompt):
            # As the host: temporal_length and the temporal guidance scale reach p_sample_ddim through **kwargs.
            z, _ = self.ddim_sampler.sample(S=ddim_steps, conditioning=cond, batch_size=batch_size, shape=noise_shape[1:],
                                            verbose=False, unconditional_guidance_scale=cfg_scale,
                                            unconditional_conditioning=uncond, eta=ddim_eta,
                                            temporal_length=noise_shape[2],
                                            conditional_guidance_scale_temporal=temporal_cfg_scale, **kwargs)
            samples.append(self.decode_first_stage(z))
        return torch.stack(samples, dim=1)
