"""Flow matching and the Wan backends: schedule by hand, the pipeline's own timesteps, experts, Flow-DPO."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import Backend
from videotuna_dpo.models.flow_matching import FlowMatchingSchedule, shift_sigmas
from videotuna_dpo.models.wan import WanBackend
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema


def make_wan(path, **overrides):
    cfg = {"name": "wan", "pretrained": str(path), "weight_dtype": "fp32", "max_sequence_length": 16,
           "lora": {"rank": 4, "alpha": 4}, **overrides}
    return WanBackend.from_config(OmegaConf.create(cfg))


def _module(backend, **dpo):
    return DPOModule(backend, OmegaConf.structured(DPOSchema(**{"beta": 500.0, **dpo})),
                     OmegaConf.structured(OptimizerSchema(lr=1e-2, weight_decay=0.0)), seed=0)


def _latent_batch(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(4, 3, 9, 32, 32, generator=g) * 2 - 1
    latents = backend.encode_video(pixels)
    return {"winner_latents": latents[:2], "loser_latents": latents[2:],
            "prompt_embeds": backend.encode_prompt(["a red square moving left", "a cat"])}


def test_schedule_by_hand_on_fixed_tensors():
    schedule = FlowMatchingSchedule(num_train_timesteps=1000, shift=3.0)
    # u = 0.5 -> s = 3 * 0.5 / (1 + 2 * 0.5) = 0.75 -> t = 750
    assert shift_sigmas(torch.tensor([0.5]), 3.0).item() == pytest.approx(0.75)
    x0 = torch.full((1, 2, 1, 1, 1), 2.0)
    noise = torch.full((1, 2, 1, 1, 1), -1.0)
    t = torch.tensor([750.0])
    assert torch.allclose(schedule.add_noise(x0, noise, t), torch.full_like(x0, 0.25 * 2 - 0.75))
    assert torch.allclose(schedule.target(x0, noise, t), torch.full_like(x0, -3.0))
    assert schedule.eps_equivalent_weight(t).item() == pytest.approx(0.0625)
    # the implied noise error: eps_hat - eps = (1 - s)(v_hat - v), for any prediction
    v_hat = torch.randn_like(x0)
    x_t = schedule.add_noise(x0, noise, t)
    eps_hat = x_t + (1 - 0.75) * v_hat  # x0_hat = x_t - s v_hat; eps_hat = x_t + (1 - s) v_hat
    assert torch.allclose(eps_hat - noise, 0.25 * (v_hat - schedule.target(x0, noise, t)), atol=1e-6)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_timestep_draws_are_diffusers_density_shifted(sampling):
    schedule = FlowMatchingSchedule(shift=5.0, sampling=sampling, logit_mean=0.3, logit_std=0.7)
    torch.manual_seed(3)
    t = schedule.sample_timesteps(6, "cpu")
    torch.manual_seed(3)
    u = torch.sigmoid(torch.normal(0.3, 0.7, size=(6,))) if sampling == "logit_normal" else torch.rand(6)
    assert torch.allclose(t, 1000 * 5 * u / (1 + 4 * u), atol=1e-4)


def test_training_timesteps_map_to_the_transformer_input_as_the_pipeline_samples(tiny_wan):
    backend = make_wan(tiny_wan("2.1"))
    assert backend.flow_schedule.shift == 3.0  # the scheduler's flow_shift (Wan2.1 at 480p)
    scheduler = backend._pipe.scheduler
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas[:10].double()
    # the pipeline feeds the transformer t = s * 1000, with s the shifted sigma our training draws
    assert torch.allclose(backend.flow_schedule.sigma(scheduler.timesteps.double()).double(), sigmas, atol=1e-3)
    u = sigmas / (3.0 - 2.0 * sigmas)  # unshift
    assert torch.allclose(shift_sigmas(u, 3.0), sigmas, atol=1e-9)
    assert np.allclose(np.diff(u.numpy()), np.diff(u.numpy())[0], atol=1e-5)  # an even grid before the shift
    assert make_wan(tiny_wan("2.1"), flow_shift=5.0).flow_schedule.shift == 5.0


def test_follows_the_protocol_and_normalises_latents_as_the_pipeline(tiny_wan):
    backend = make_wan(tiny_wan("2.1"))
    assert isinstance(backend, Backend)
    pixels = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    mean, std = backend.latent_distribution(pixels)
    assert mean.shape == (1, 16, 3, 4, 4)
    raw = backend.vae.encode(pixels).latent_dist.mean
    cfg = backend.vae.config
    expected = (raw - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(mean, expected, atol=1e-5)
    # decode undoes it exactly as WanPipeline does before vae.decode
    assert torch.allclose(backend.decode_latents(mean), backend.vae.decode(raw).sample, atol=1e-5)
    with pytest.raises(UserError, match=r"4k\+1 frames.*data.video_length to 5 or 9"):
        backend.latent_distribution(torch.zeros(1, 3, 8, 32, 32))


def test_policy_equals_reference_at_step_zero_loss_log2(tiny_wan):
    for variant in ("2.1", "2.2-ti2v"):
        backend = make_wan(tiny_wan(variant))
        torch.manual_seed(0)
        out, used = _module(backend).dpo_step(_latent_batch(backend))
        assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6), variant
        assert torch.equal(used["model_err_w"], used["ref_err_w"])


def test_eps_equivalent_beta_scales_each_pair_by_one_minus_s_squared(tiny_wan):
    backend = make_wan(tiny_wan("2.1"))
    batch = _latent_batch(backend)
    with torch.no_grad():
        for name, p in backend.transformer.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    torch.manual_seed(5)
    const, used = _module(backend).dpo_step(batch)
    torch.manual_seed(5)
    eps, used_eps = _module(backend, beta_schedule="eps_equivalent").dpo_step(batch)
    assert torch.equal(used["t"], used_eps["t"])
    s = used["t"][:2] / 1000
    assert torch.allclose(eps.inside, const.inside * (1 - s) ** 2, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(eps.inside, const.inside)


def test_flow_settings_are_refused_on_non_flow_backends(tiny_cogvideox):
    from tests.conftest import make_backend

    backend = make_backend(tiny_cogvideox)
    with pytest.raises(UserError, match="dpo.beta_schedule='eps_equivalent' applies to flow-matching backends"):
        _module(backend, beta_schedule="eps_equivalent")
    with pytest.raises(UserError, match="dpo.timestep_sampling='logit_normal' applies to flow-matching"):
        _module(backend, timestep_sampling="logit_normal")


def test_timestep_sampling_reaches_the_backend(tiny_wan):
    backend = make_wan(tiny_wan("2.1"))
    _module(backend, timestep_sampling="logit_normal", logit_mean=1.0, logit_std=0.5)
    s = backend.flow_schedule
    assert (s.sampling, s.logit_mean, s.logit_std, s.shift) == ("logit_normal", 1.0, 0.5, 3.0)


def _record_experts(backend):
    seen = {"transformer": [], "transformer_2": []}
    for attr in seen:
        getattr(backend, attr).register_forward_pre_hook(
            lambda m, args, kwargs, attr=attr: seen[attr].append(kwargs["timestep"].clone()), with_kwargs=True)
    return seen


def test_a14b_routes_each_sample_to_its_expert(tiny_wan):
    backend = make_wan(tiny_wan("2.2-a14b"))
    assert backend.boundary_timestep == pytest.approx(875.0)
    seen = _record_experts(backend)
    batch = _latent_batch(backend)
    noisy = torch.randn(4, *batch["winner_latents"].shape[1:])
    t = torch.tensor([990.0, 875.0, 874.9, 10.0])
    cond = torch.cat([batch["prompt_embeds"]] * 2)
    out = backend.predict(noisy, t, cond)
    assert torch.equal(torch.cat(seen["transformer"]), torch.tensor([990.0, 875.0]))
    assert torch.equal(torch.cat(seen["transformer_2"]), torch.tensor([874.9, 10.0]))
    # each row is that expert's own prediction
    alone = backend._predict_with(backend.transformer_2, noisy[2:3], t[2:3], cond[2:3])
    assert torch.allclose(out[2:3], alone, atol=1e-6)


@pytest.mark.parametrize("expert,trained,frozen", [("high", "transformer", "transformer_2"),
                                                   ("low", "transformer_2", "transformer")])
def test_training_one_expert_changes_only_it_and_draws_only_its_range(tiny_wan, expert, trained, frozen):
    backend = make_wan(tiny_wan("2.2-a14b"), train_experts=expert)
    assert {n.split(".")[0] for n, p in backend.named_parameters() if p.requires_grad} == {trained}
    module = _module(backend)
    before = {n: p.detach().clone() for n, p in backend.named_parameters()}
    optimizer = module.configure_optimizers()["optimizer"]
    batch = _latent_batch(backend)
    ts = []
    for step in range(3):
        torch.manual_seed(step)
        out, used = module.dpo_step(batch)
        ts.append(used["t"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    t = torch.cat(ts)
    assert bool((t >= 875).all()) if expert == "high" else bool((t < 875).all())
    changed = {n.split(".")[0] for n, p in backend.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {trained}
    assert all(torch.equal(p, before[f"{frozen}.{n}"]) for n, p in getattr(backend, frozen).named_parameters())


def test_two_expert_lora_roundtrip_and_mismatch_named(tiny_wan, tmp_path):
    path = tiny_wan("2.2-a14b")
    backend = make_wan(path)
    with torch.no_grad():
        for name, p in backend.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    backend.save_trainable(tmp_path / "w")
    meta = json.loads((tmp_path / "w" / "trainable.json").read_text())
    assert meta["trained"] == ["transformer", "transformer_2"]
    again = make_wan(path, trainable_weights=str(tmp_path / "w"))
    batch = _latent_batch(backend)
    t = torch.tensor([950.0, 100.0])
    noisy = torch.randn_like(batch["winner_latents"])
    assert torch.allclose(again.predict(noisy, t, batch["prompt_embeds"]),
                          backend.predict(noisy, t, batch["prompt_embeds"]), atol=1e-6)
    with pytest.raises(UserError, match="denoiser\\(s\\) transformer, transformer_2, but this config trains transformer; set model.train_experts"):
        make_wan(path, train_experts="high", trainable_weights=str(tmp_path / "w"))


def test_bad_expert_settings_are_named(tiny_wan):
    with pytest.raises(UserError, match="model.train_experts='high' needs a two-expert model"):
        make_wan(tiny_wan("2.1"), train_experts="high")
    with pytest.raises(UserError, match="model.train_experts must be one of both, high, low"):
        make_wan(tiny_wan("2.2-a14b"), train_experts="middle")


def test_generate_is_per_prompt_seeded(tiny_wan):
    backend = make_wan(tiny_wan("2.1"))
    both = backend.generate(["a red square", "a cat"], num_frames=5, steps=2, guidance=2.0, seed=[7, 8],
                            height=32, width=32)
    alone = backend.generate(["a cat"], num_frames=5, steps=2, guidance=2.0, seed=[8], height=32, width=32)
    assert both.shape == (2, 5, 3, 32, 32)
    assert torch.allclose(both[1:], alone, atol=1e-5)


def test_one_expert_from_a_latent_cache_loads_only_that_expert(tiny_wan):
    path = tiny_wan("2.2-a14b")
    full = make_wan(path)
    batch = _latent_batch(full)
    backend = make_wan(path, train_experts="low", load_text_and_vae=False)
    assert backend.denoiser_attrs == ("transformer_2",) and "transformer" not in dict(backend.named_children())
    torch.manual_seed(0)
    out, used = _module(backend).dpo_step(batch)
    assert bool((used["t"] < 875).all()) and out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(UserError, match="needs transformer, which was not loaded"):
        backend.predict(batch["winner_latents"], torch.tensor([900.0, 900.0]), batch["prompt_embeds"])


@pytest.mark.parametrize("variant,on_cpu", [("2.1", True), ("2.2-a14b", False)])
def test_full_finetune_keeps_a_frozen_reference_of_each_trained_expert(tiny_wan, variant, on_cpu):
    backend = make_wan(tiny_wan(variant), finetune="full", reference_on_cpu=on_cpu)
    experts = backend.trained_attrs
    copies = backend._ref_cpu if on_cpu else dict(backend.ref_denoisers.items())
    assert sorted(copies) == sorted(experts)
    module = _module(backend)
    batch = _latent_batch(backend)
    optimizer = module.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    out, _ = module.dpo_step(batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    for attr in experts:  # the policy moved, each copy did not
        live, ref = dict(getattr(backend, attr).named_parameters()), dict(copies[attr].named_parameters())
        assert any(not torch.equal(live[n], ref[n]) for n in live)
        assert all(not p.requires_grad for p in ref.values())
    noisy = torch.randn(2, *batch["winner_latents"].shape[1:])
    t = torch.tensor([950.0, 100.0])
    with backend.reference() as reference:
        ref_out = reference(noisy, t, batch["prompt_embeds"])
    fresh = make_wan(tiny_wan(variant), finetune="full")
    assert torch.allclose(ref_out, fresh.predict(noisy, t, batch["prompt_embeds"]), atol=1e-5)
