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
