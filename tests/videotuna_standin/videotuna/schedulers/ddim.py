"""Stand-in for videotuna.schedulers.ddim.DDIMSampler: uniform DDIM steps, eta, CFG, VC2 scale_arr."""

import numpy as np
import torch


class DDIMSampler:
    def __init__(self, model, schedule="linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps

    def make_schedule(self, ddim_num_steps, ddim_eta=0.0):
        c = self.ddpm_num_timesteps // ddim_num_steps
        self.ddim_timesteps = np.asarray(list(range(0, self.ddpm_num_timesteps, c))) + 1
        a = self.model.diffusion_scheduler.alphas_cumprod.cpu()
        self.ddim_alphas = a[self.ddim_timesteps]
        self.ddim_alphas_prev = torch.tensor([a[0].item()] + a[self.ddim_timesteps[:-1]].tolist())
        self.ddim_sigmas = ddim_eta * torch.sqrt((1 - self.ddim_alphas_prev) / (1 - self.ddim_alphas)
                                                 * (1 - self.ddim_alphas / self.ddim_alphas_prev))
        if self.model.use_scale:
            scale = self.model.scale_arr.cpu()
            self.ddim_scale_arr = scale[self.ddim_timesteps]
            self.ddim_scale_arr_prev = torch.tensor([scale[0].item()] + scale[self.ddim_timesteps[:-1]].tolist())

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, normals_sequence=None, img_callback=None,
               quantize_x0=False, eta=0.0, mask=None, x0=None, temperature=1.0, noise_dropout=0.0,
               score_corrector=None, corrector_kwargs=None, verbose=True, schedule_verbose=False, x_T=None,
               log_every_t=100, unconditional_guidance_scale=1.0, unconditional_conditioning=None, precision=None,
               fs=None, timestep_spacing="uniform", guidance_rescale=0.0, **kwargs):
        self.make_schedule(S, eta)
        device = self.model.device
        img = torch.randn((batch_size, *shape), device=device) if x_T is None else x_T
        for i, step in enumerate(np.flip(self.ddim_timesteps)):
            index = len(self.ddim_timesteps) - i - 1
            ts = torch.full((batch_size,), int(step), device=device, dtype=torch.long)
            img, _ = self.p_sample_ddim(img, conditioning, ts, index, unconditional_guidance_scale,
                                        unconditional_conditioning, **kwargs)
        return img, {}

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, unconditional_guidance_scale=1.0, unconditional_conditioning=None,
                      temporal_length=None, conditional_guidance_scale_temporal=None, **kwargs):
        e_t = self.model.apply_model(x, t, c, **kwargs)
        if unconditional_conditioning is not None and unconditional_guidance_scale != 1.0:
            e_uncond = self.model.apply_model(x, t, unconditional_conditioning, **kwargs)
            e_t = e_uncond + unconditional_guidance_scale * (e_t - e_uncond)
        size = (x.shape[0],) + (1,) * (x.dim() - 1)
        full = lambda v: torch.full(size, float(v), device=x.device)
        a_t, a_prev, sigma = full(self.ddim_alphas[index]), full(self.ddim_alphas_prev[index]), full(self.ddim_sigmas[index])
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt() * e_t
        noise = sigma * torch.randn_like(x)
        if self.model.use_scale:
            pred_x0 = pred_x0 / full(self.ddim_scale_arr[index])
            return a_prev.sqrt() * full(self.ddim_scale_arr_prev[index]) * pred_x0 + dir_xt + noise, pred_x0
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0
