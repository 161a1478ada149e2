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


# HunyuanVideo's Llama 3 special tokens: its prompt template is written in them.
_LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_llama3_tokenizer():
    """A character-level Llama tokenizer with Llama 3's special tokens: HunyuanVideo's template tokenizes.

    BOS is added, padding is on the right (as HunyuanVideo's tokenizer): the transformer reads the
    attention mask as a prefix of valid tokens.
    """
    import string

    from transformers import LlamaTokenizerFast

    chars = ["\u2581", "\n"] + list(string.ascii_letters + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(["<unk>", *_LLAMA3_SPECIAL, "<pad>", *chars])}
    tokenizer = LlamaTokenizerFast(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<pad>", add_bos_token=True,
                                   padding_side="right", add_prefix_space=False)
    tokenizer.add_special_tokens({"additional_special_tokens": _LLAMA3_SPECIAL[2:]})
    return tokenizer


def tiny_clip_tokenizer():
    """A character-level CLIP BPE tokenizer (words end in ``</w>``), as CLIP's tokenizer lays its vocabulary out."""
    import string

    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_hunyuan_video(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny HunyuanVideo (transformer, VAE, Llama + CLIP text encoders and tokenizers, scheduler).

    Same classes and layout as hunyuanvideo-community/HunyuanVideo: guidance-distilled transformer,
    causal VAE (4x time, 8x space, scaling_factor 0.476986), FlowMatchEuler with shift 7.0. Llama width 32,
    CLIP pooled width 16; 9 frames of 32x32 pixels -> latents [4, 3, 4, 4].
    """
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer = tiny_llama3_tokenizer()
    # 3 layers: the pipeline reads hidden_states[-3], the output of a real layer (not the embedding table).
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    tokenizer_2 = tiny_clip_tokenizer()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id))
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                     norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
                                     temporal_compression_ratio=4)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(2, 2, 4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)  # HunyuanVideo's shipped scheduler
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
