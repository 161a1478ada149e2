"""Stand-in for ``videotuna.flow.wanvideo.WanVideoModelFlow``: its constructor, the ``wan_t2v`` pipeline
over the flow's own components, ``from_pretrained`` (T5 + VAE from ``ckpt_path``; an optional trained
denoiser) and the host's own no-op ``log_images``."""

import os

from videotuna.base.generation_base import GenerationBase
from videotuna.models.wan.wan.configs import WAN_CONFIGS
from videotuna.models.wan.wan.text2video import WanT2V


class WanVideoModelFlow(GenerationBase):
    def __init__(self, first_stage_config, cond_stage_config, denoiser_config, scheduler_config=None,
                 cond_stage_2_config=None, lora_config=None, task="t2v-14B", ckpt_path=None, offload_model=None,
                 ulysses_size=1, ring_size=1, t5_fsdp=False, t5_cpu=False, dit_fsdp=False, use_prompt_extend=False,
                 prompt_extend_method="local_qwen", prompt_extend_model=None, prompt_extend_target_lang="zh",
                 seed=-1, *args, **kwargs):
        assert ckpt_path is not None, "Please specify the checkpoint directory."
        assert task in WAN_CONFIGS, f"Unsupport task: {task}"
        super().__init__(first_stage_config=first_stage_config, cond_stage_config=cond_stage_config,
                         denoiser_config=denoiser_config, scheduler_config=scheduler_config,
                         cond_stage_2_config=cond_stage_2_config, lora_config=lora_config, trainable_components=[])
        self.task, self.ckpt_path, self.seed = task, ckpt_path, seed
        self.offload_model = offload_model
        self.cfg = WAN_CONFIGS[task]
        rank, local_rank = int(os.getenv("RANK", 0)), int(os.getenv("LOCAL_RANK", 0))
        self.wan_t2v = WanT2V(config=self.cfg, checkpoint_dir=ckpt_path, device_id=local_rank, rank=rank,
                              t5_fsdp=t5_fsdp, dit_fsdp=dit_fsdp, use_usp=False, t5_cpu=t5_cpu,
                              first_stage_model=self.first_stage_model, cond_stage_model=self.cond_stage_model,
                              denoiser=self.denoiser)

    def from_pretrained(self, ckpt_path=None, denoiser_ckpt_path=None, lora_ckpt_path=None, ignore_missing_ckpts=False):
        self.wan_t2v.load_weight()
        self.load_denoiser(ckpt_path, denoiser_ckpt_path, True)

    def log_images(self, batch, **kwargs):
        pass
