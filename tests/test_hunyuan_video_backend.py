"""The HunyuanVideo backend: packed two-encoder conditioning, the pipeline's latent scaling, timesteps and
distilled guidance as the pipeline passes them, Flow-DPO at step 0, LoRA weights, seeded sampling."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from videotuna_dpo.config import load_config, validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import Backend
from videotuna_dpo.models.flow_matching import shift_sigmas
from videotuna_dpo.models.hunyuan_video import (HunyuanVideoBackend, HunyuanVideoSchema, pack_conditioning,
                                                unpack_conditioning)
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema, TrainSchema, check_training_values

ROOT = Path(__file__).resolve().parents[1]
SCALING = 0.476986  # HunyuanVideo's VAE scaling_factor (the tiny VAE is saved with it)


def make_hunyuan(path, **overrides):
    cfg = {"name": "hunyuanvideo", "pretrained": str(path), "weight_dtype": "fp32", "vae_dtype": "fp32",
           "max_sequence_length": 16, "lora": {"rank": 4, "alpha": 4}, **overrides}
    return HunyuanVideoBackend.from_config(OmegaConf.create(cfg))


def _module(backend, **dpo):
    return DPOModule(backend, OmegaConf.structured(DPOSchema(**{"beta": 500.0, **dpo})),
                     OmegaConf.structured(OptimizerSchema(lr=1e-2, weight_decay=0.0)), seed=0)


def _latent_batch(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = backend.encode_video(torch.rand(4, 3, 5, 32, 32, generator=g) * 2 - 1)  # [4, 4, 2, 4, 4]
    return {"winner_latents": latents[:2], "loser_latents": latents[2:],
            "prompt_embeds": backend.encode_prompt(["a red square moving left", "a cat"])}


def _record_transformer_calls(transformer):
    calls = []
    transformer.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append({k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}),
        with_kwargs=True)
    return calls


def test_pack_and_unpack_conditioning_by_hand():
    embeds = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # [B=2, L=3, D=4]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])  # [B, D2=2]
    packed = pack_conditioning(embeds, mask, pooled)
    assert packed.shape == (2, 4, 5) and packed.dtype == torch.float32
    assert torch.equal(packed[1, 0], torch.tensor([12.0, 13.0, 14.0, 15.0, 1.0]))
    assert torch.equal(packed[1, 2], torch.tensor([20.0, 21.0, 22.0, 23.0, 0.0]))
    assert torch.equal(packed[0, 3], torch.tensor([-1.0, -2.0, 0.0, 0.0, 1.0]))
    e, m, p = unpack_conditioning(packed, text_dim=4, pooled_dim=2)
    assert torch.equal(e, embeds) and torch.equal(m, mask.float()) and torch.equal(p, pooled)
    # a pooled vector wider than the text embeddings sets the width
    assert pack_conditioning(embeds, mask, torch.ones(2, 6)).shape == (2, 4, 7)
    with pytest.raises(UserError, match=r"takes \[B, L \+ 1, 33\] \(text_embed_dim 32, pooled_projection_dim 16\)"):
        unpack_conditioning(packed, text_dim=32, pooled_dim=16)


def test_follows_the_protocol_and_scales_latents_as_the_pipeline(tiny_hunyuan_video):
    backend = make_hunyuan(tiny_hunyuan_video)
    assert isinstance(backend, Backend)
    assert backend.vae.config.scaling_factor == pytest.approx(SCALING)
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mean, std = backend.latent_distribution(pixels)
    assert mean.shape == std.shape == (1, 4, 3, 4, 4)  # [B, C', (9 - 1) / 4 + 1, 32 / 8, 32 / 8]
    dist = backend.vae.encode(pixels).latent_dist
    assert torch.allclose(mean, dist.mean * SCALING, atol=1e-6)
    assert torch.allclose(std, dist.std * SCALING, atol=1e-6)
    # decode undoes it as HunyuanVideoPipeline does: latents / scaling_factor, then vae.decode
    assert torch.allclose(backend.decode_latents(mean), backend.vae.decode(dist.mean).sample, atol=1e-5)
    with pytest.raises(UserError, match=r"4k\+1 frames.*data.video_length to 5 or 9"):
        backend.latent_distribution(torch.zeros(1, 3, 8, 32, 32))
    with pytest.raises(UserError, match=r"multiples of 16; got 40x32: set data.resolution"):
        backend.latent_distribution(torch.zeros(1, 3, 5, 40, 32))


def test_prompts_are_encoded_as_the_pipeline_with_the_template_cropped_at_the_caption(tiny_hunyuan_video):
    backend = make_hunyuan(tiny_hunyuan_video)
    tok, template = backend.tokenizer, backend.prompt_template["template"]
    crop = backend.prompt_template["crop_start"]
    ids = tok(template.format("a cat"))["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[crop:]) == ["a", "\u2581", "c", "a", "t", "<|eot_id|>"]
    cond = backend.encode_prompt(["a cat", ""])
    assert cond.shape == (2, 16 + 1, max(32, 16) + 1)
    embeds, mask, pooled = unpack_conditioning(cond, 32, 16)
    assert mask.sum(1).tolist() == [6.0, 1.0]  # "a cat" + <|eot_id|>; the empty caption keeps <|eot_id|>
    # by hand: Llama's third-to-last hidden states from the caption on, CLIP's pooled output over 77 tokens
    inputs = tok([template.format("a cat")], padding="max_length", max_length=crop + 16, return_tensors="pt")
    hidden = backend.text_encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                  output_hidden_states=True).hidden_states[-3]
    assert torch.allclose(embeds[:1], hidden[:, crop:], atol=1e-6)
    clip_ids = backend.tokenizer_2(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.allclose(pooled[:1], backend.text_encoder_2(clip_ids).pooler_output, atol=1e-6)
    # a configured crop_start reaches the pipeline unchanged (HunyuanVideo's tokenizer: 95)
    assert make_hunyuan(tiny_hunyuan_video, crop_start=95).prompt_template["crop_start"] == 95


def test_the_flow_shift_is_the_schedulers_and_maps_to_the_pipelines_timesteps(tiny_hunyuan_video):
    backend = make_hunyuan(tiny_hunyuan_video)
    assert backend.flow_schedule.shift == 7.0 and backend.flow_schedule.num_train_timesteps == 1000
    scheduler = backend._pipe.scheduler
    u = np.linspace(1.0, 0.0, 11)[:-1]  # the pipeline's sigmas before the scheduler's shift
    scheduler.set_timesteps(sigmas=u)
    assert torch.allclose(backend.flow_schedule.sigma(scheduler.timesteps).double(),
                          shift_sigmas(torch.from_numpy(u), 7.0), atol=1e-5)
    assert make_hunyuan(tiny_hunyuan_video, flow_shift=5.0).flow_schedule.shift == 5.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_training_feeds_the_transformer_what_the_pipeline_feeds_it(tiny_hunyuan_video, dtype):
    backend = make_hunyuan(tiny_hunyuan_video, weight_dtype=dtype)
    torch_dtype = backend.transformer.dtype
    calls = _record_transformer_calls(backend.transformer)
    backend.generate(["a red square"], num_frames=5, steps=2, guidance=6.0, seed=0, height=32, width=32)
    sampled = calls[0]  # the first step: t = 1000, float32
    assert sampled["timestep"].dtype == torch.float32 and sampled["timestep"].tolist() == [1000.0]
    # the second step: shift(0.5) * 1000 = 7 * 0.5 / (1 + 6 * 0.5) * 1000 = 875, which the pipeline passes in
    # the latents' dtype: bf16 once the scheduler has returned bf16 latents (876); training keeps t exact
    assert calls[1]["timestep"].float().tolist() == [875.0 if dtype == "fp32" else 876.0]
    # guidance: 6.0 in the transformer's dtype, times 1000 (bf16 rounds 6000 to 6016, in both)
    assert sampled["guidance"].dtype == torch_dtype
    assert sampled["guidance"].item() == (6000.0 if dtype == "fp32" else 6016.0)
    calls.clear()
    backend.predict(sampled["hidden_states"].float(), sampled["timestep"], backend.encode_prompt(["a red square"]))
    trained = calls[0]
    assert trained.keys() == sampled.keys()
    for key in ("timestep", "guidance", "encoder_attention_mask"):
        assert trained[key].dtype == sampled[key].dtype and torch.equal(trained[key], sampled[key]), key
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        assert trained[key].dtype == torch_dtype
        assert torch.allclose(trained[key].float(), sampled[key].float(), atol=1e-6), key
    calls.clear()
    tuned = make_hunyuan(tiny_hunyuan_video, embedded_guidance=3.5)
    calls = _record_transformer_calls(tuned.transformer)
    tuned.predict(torch.zeros(2, 4, 2, 4, 4), torch.tensor([10.0, 990.0]), tuned.encode_prompt(["a", "b"]))
    assert calls[0]["guidance"].tolist() == [3500.0, 3500.0]


def test_policy_equals_reference_at_step_zero_loss_log2(tiny_hunyuan_video):
    backend = make_hunyuan(tiny_hunyuan_video)
    torch.manual_seed(0)
    out, used = _module(backend).dpo_step(_latent_batch(backend))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(used["model_err_w"], used["ref_err_w"])
    assert bool((used["t"] > 0).all() and (used["t"] < 1000).all())


def test_caption_dropout_trains_on_the_empty_captions_packed_conditioning(tiny_hunyuan_video):
    backend = make_hunyuan(tiny_hunyuan_video)
    batch = _latent_batch(backend)
    null = backend.encode_prompt([""])
    module = _module(backend, uncond_prob=0.999)
    cached = {**batch, "null_embeds": torch.cat([null, null]).half().float()}  # as the fp16 cache collates it
    from_pixels = {"caption": ["a red square moving left", "a cat"]}  # the pixel path encodes "" itself
    for source, expected in ((cached, cached["null_embeds"]), (from_pixels, torch.cat([null, null]))):
        torch.manual_seed(0)
        dropped = module._drop_captions(source, batch["prompt_embeds"])
        assert torch.equal(dropped, expected)
        _, mask, _ = unpack_conditioning(dropped, 32, 16)
        assert mask.sum(1).tolist() == [1.0, 1.0]  # the empty caption's one token, <|eot_id|>


def test_lora_roundtrip_gives_the_same_predictions(tiny_hunyuan_video, tmp_path):
    backend = make_hunyuan(tiny_hunyuan_video)
    with torch.no_grad():
        for name, p in backend.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    backend.save_trainable(tmp_path / "w")
    again = make_hunyuan(tiny_hunyuan_video, trainable_weights=str(tmp_path / "w"))
    batch = _latent_batch(backend)
    noisy, t = torch.randn_like(batch["winner_latents"]), torch.tensor([950.0, 100.0])
    tuned = backend.predict(noisy, t, batch["prompt_embeds"])
    assert torch.allclose(again.predict(noisy, t, batch["prompt_embeds"]), tuned, atol=1e-6)
    with backend.reference() as reference:
        assert not torch.allclose(reference(noisy, t, batch["prompt_embeds"]), tuned, atol=1e-3)


def test_generate_is_per_prompt_seeded(tiny_hunyuan_video):
    backend = make_hunyuan(tiny_hunyuan_video)
    kw = dict(num_frames=5, steps=2, guidance=6.0, height=32, width=32)
    both = backend.generate(["a red square", "a cat"], seed=[7, 8], **kw)
    alone = backend.generate(["a cat"], seed=[8], **kw)
    assert both.shape == (2, 5, 3, 32, 32)
    assert torch.allclose(both[1:], alone, atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)
    with pytest.raises(UserError, match="set model.true_cfg_scale > 1"):
        backend.generate(["a cat"], seed=[8], negative_prompt="blurry", **kw)
    # true classifier-free guidance: a second, negative-prompt pass each step
    calls = _record_transformer_calls(backend.transformer)
    cfg = backend.generate(["a cat"], seed=[8], negative_prompt="blurry", true_cfg_scale=3.0, **kw)
    assert len(calls) == 2 * 2 and not torch.allclose(cfg, alone, atol=1e-3)


def test_shipped_config_validates_with_the_settings_people_use():
    path = ROOT / "configs" / "dpo" / "hunyuan_video.yaml"
    cfg = load_config(path)
    top = validate(cfg, TrainSchema, "", str(path))
    check_training_values(top.dpo, top.optimizer, "", str(path))
    model = validate(cfg.model, HunyuanVideoSchema, "model", str(path))
    assert (model.name, model.finetune, model.embedded_guidance, model.flow_shift) == ("hunyuanvideo", "lora", 6.0, 7.0)
    assert (top.dpo.beta, top.dpo.beta_schedule, top.dpo.uncond_prob) == (500.0, "constant", 0.0)
    assert (cfg.data.video_length - 1) % 4 == 0 and all(x % 16 == 0 for x in cfg.data.resolution)
    assert (cfg.generate.num_frames, cfg.generate.steps, cfg.generate.guidance) == (129, 50, 6.0)
    assert all(x % 16 == 0 for x in (cfg.generate.height, cfg.generate.width))
