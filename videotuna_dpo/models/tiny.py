"""Tiny random-weight instances of the real architectures, saved in the layout users load from."""

from __future__ import annotations

from pathlib import Path

import torch

# A unigram vocabulary over characters plus a few whole words: any lowercase caption tokenizes.
_WORDS = ["a", "the", "red", "green", "blue", "square", "circle", "moving", "left", "right", "up", "down", "cat", "dog"]


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in _WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_cogvideox(path: str | Path, seed: int = 0, rotary: bool = False) -> Path:
    """Write a tiny CogVideoX (transformer, VAE, T5, tokenizer, v-prediction scheduler) to ``path``.

    Same classes and layout as THUDM/CogVideoX-2b: 9 frames of 32x32 pixels -> latents [3, 4, 8, 8].
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16),
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=32,
        sample_width=32,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=rotary,
    )
    # CogVideoX-2b's own scheduler settings.
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0, timestep_spacing="trailing",
    )
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


WAN_VARIANTS = ("2.1", "2.2-a14b", "2.2-ti2v")


def build_tiny_wan(path: str | Path, variant: str = "2.1", seed: int = 0) -> Path:
    """Write a tiny Wan (transformer(s), VAE, UMT5, tokenizer, flow scheduler) in the diffusers layout.

    ``2.1``: as Wan2.1-T2V-1.3B (16-channel VAE, UniPC with flow_shift 3.0); ``2.2-a14b``: two experts
    switched at boundary_ratio 0.875; ``2.2-ti2v``: as Wan2.2-TI2V-5B (48-channel residual VAE with
    2x2 patchify, per-patch timesteps). 9 frames of 32x32 pixels -> latents [C', 3, 4, 4] ([48, 3, 2, 2]).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant must be one of {WAN_VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    ti2v = variant == "2.2-ti2v"
    z_dim = 48 if ti2v else 16
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=torch.linspace(-0.5, 0.5, z_dim).tolist(), latents_std=torch.linspace(0.8, 1.6, z_dim).tolist(),
        **({"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}
           if ti2v else {}),
    )

    def transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=z_dim, out_channels=z_dim, text_dim=32, freq_dim=32, ffn_dim=64,
                                     num_layers=2, rope_max_seq_len=64)

    # Wan2.1's shipped scheduler: UniPC over flow sigmas, flow_shift 3.0 (480p).
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0 if variant == "2.1" else 5.0)
    two = variant == "2.2-a14b"
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer(), transformer_2=transformer() if two else None,
                       boundary_ratio=0.875 if two else None, expand_timesteps=ti2v)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
