"""Stand-in for ``videotuna.models.wan.wan.configs``: the task table with Wan2.1's real T2V settings."""

import copy

import torch


class EasyDict(dict):
    """The host's configs are ``easydict.EasyDict``: a dict read by attribute."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_shared = dict(t5_model="umt5_xxl", t5_dtype=torch.bfloat16, text_len=512, param_dtype=torch.bfloat16,
               num_train_timesteps=1000, sample_fps=16, sample_neg_prompt="static, blurry, worst quality",
               t5_checkpoint="models_t5_umt5-xxl-enc-bf16.pth", t5_tokenizer="google/umt5-xxl",
               vae_checkpoint="Wan2.1_VAE.pth", vae_stride=(4, 8, 8), patch_size=(1, 2, 2), freq_dim=256,
               window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)

t2v_1_3B = EasyDict(__name__="Config: Wan T2V 1.3B", **_shared, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
t2v_14B = EasyDict(__name__="Config: Wan T2V 14B", **_shared, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
t2i_14B = EasyDict(copy.deepcopy(dict(t2v_14B)))

WAN_CONFIGS = {"t2v-14B": t2v_14B, "t2v-1.3B": t2v_1_3B, "t2i-14B": t2i_14B}
SIZE_CONFIGS = {"720*1280": (720, 1280), "1280*720": (1280, 720), "480*832": (480, 832), "832*480": (832, 480)}
SUPPORTED_SIZES = {"t2v-14B": tuple(SIZE_CONFIGS), "t2v-1.3B": ("480*832", "832*480"), "t2i-14B": tuple(SIZE_CONFIGS)}
