"""Wan2.1 through VideoTuna's WanVideoModelFlow (the stand-in): the host's flow matching, layouts, DPO, weights,
sampling."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.videotuna_fixtures import dpo_module, make_wan, train_steps, wan_files, wan_pair_batch  # noqa: F401
from videotuna_dpo.errors import UserError


def test_training_noise_levels_are_the_hosts_shift_5_grid_and_the_target_is_the_velocity(wan_files):
    backend = make_wan(wan_files)
    torch.manual_seed(0)
    t = backend.sample_timesteps(4000, "cpu")
    s = t / 1000
    u = s / (5 - 4 * s)  # the inverse of s = 5u / (1 + 4u)
    k = u * 1000
    # WanT2V.training_step: FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True), 1000 levels u = k / 1000
    assert torch.allclose(k, k.round(), atol=2e-3) and k.round().min() >= 1 and k.round().max() == 1000
    assert len(set(k.round().tolist())) > 900
    assert backend.flow_schedule.shift == 5.0
    x0, noise = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 2, 4, 4)
    s_half = 2.5 / 3  # u = 0.5 shifted by 5
    t_half = torch.tensor([1000 * s_half])
    assert torch.allclose(backend.add_noise(x0, noise, t_half), (1 - s_half) * x0 + s_half * noise, atol=1e-6)
    assert torch.equal(backend.target(x0, noise, t_half), noise - x0)
    assert backend.eps_equivalent_weight(t_half).item() == pytest.approx((1 - s_half) ** 2)


def test_other_timestep_sampling_draws_continuous_levels_off_the_grid(wan_files):
    backend = make_wan(wan_files)
    backend.set_timestep_sampling("logit_normal")
    torch.manual_seed(0)
    s = backend.sample_timesteps(200, "cpu") / 1000
    k = s / (5 - 4 * s) * 1000
    assert (k - k.round()).abs().max() > 0.1
    assert backend.flow_schedule.shift == 5.0  # the host's shift is kept


def test_latent_and_condition_layouts(wan_files, wan_pair_batch):
    backend = make_wan(wan_files)
    latents = backend.encode_video(wan_pair_batch["winner"])
    assert latents.shape == (2, 16, 2, 4, 4)  # [B, 16, 1 + (F - 1) / 4, H / 8, W / 8]
    mean, std = backend.latent_distribution(wan_pair_batch["winner"])
    assert torch.equal(mean, latents) and torch.count_nonzero(std) == 0  # the host trains on the VAE mean
    # the host's own encoding: the VAE wrapper with its latent statistics, one video at a time
    host = backend.flow.wan_t2v.vae.encode(list(wan_pair_batch["winner"]))
    assert torch.allclose(torch.stack(host), latents, atol=1e-6)
    cond = backend.encode_prompt(["a red square", "a dog"])
    assert cond.shape == (2, 64, 4096)
    tokens = backend.flow.wan_t2v.text_encoder(["a red square"], torch.device("cpu"))[0]
    n = tokens.shape[0]
    assert torch.allclose(cond[0, :n], tokens.float()) and torch.count_nonzero(cond[0, n:]) == 0


def test_prompt_embeddings_do_not_depend_on_the_t5_dropout_mode(wan_files):
    backend = make_wan(wan_files)
    backend.flow.cond_stage_model.train()  # Lightning puts every submodule in train mode; the T5 has dropout 0.1
    a, b = backend.encode_prompt(["a red square"]), backend.encode_prompt(["a red square"])
    assert torch.equal(a, b) and backend.flow.cond_stage_model.training


@pytest.mark.parametrize("finetune,beta_schedule", [("lora", "constant"), ("lora", "eps_equivalent"),
                                                    ("full", "constant")])
def test_policy_equals_reference_at_step_0_so_the_first_loss_is_log_2(wan_files, wan_pair_batch, finetune,
                                                                      beta_schedule):
    backend = make_wan(wan_files, finetune=finetune)
    torch.manual_seed(1)
    out, used = dpo_module(backend, beta=5000, beta_schedule=beta_schedule).dpo_step(wan_pair_batch)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(used["model_err_w"], used["ref_err_w"]) and used["model_err_w"].min() > 0


def test_lora_trains_only_vtuna_s_targets_and_the_reference_stays_the_base_model(wan_files, wan_pair_batch):
    backend = make_wan(wan_files)
    module = dpo_module(backend, lr=1e-2)
    trainable = {n for n, p in backend.denoiser.named_parameters() if p.requires_grad}
    layers = {n.split(".lora_")[0].split(".", 2)[2] for n in trainable}  # blocks.<i>.<layer>.lora_*
    assert layers == {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                      "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"}
    assert backend.flow.use_lora and backend.flow.lora_params == trainable  # what the host's bookkeeping expects
    x, t = torch.randn(2, 16, 2, 4, 4), torch.tensor([900.0, 300.0])
    cond = backend.encode_prompt(["a red square", "a dog"])
    with torch.no_grad():
        base = backend.predict(x, t, cond)
    train_steps(module, wan_pair_batch, 2, seed=1)
    with torch.no_grad(), backend.reference() as reference:
        assert torch.allclose(reference(x, t, cond), base, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(backend.predict(x, t, cond), base, atol=1e-4)


def test_full_finetune_trains_the_denoiser_and_a_frozen_copy_is_the_reference(wan_files, wan_pair_batch):
    backend = make_wan(wan_files, finetune="full", reference_on_cpu=True)
    module = dpo_module(backend, lr=1e-3)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert names == {"backend.flow.denoiser." + n for n, _ in backend.denoiser.named_parameters()}
    reference = backend._ref_cpu["denoiser"]
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    train_steps(module, wan_pair_batch, 1, seed=1)
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0])
    cond = backend.encode_prompt(["a dog"])
    with torch.no_grad(), backend.reference() as ref:
        assert not torch.allclose(ref(x, t, cond), backend.predict(x, t, cond), atol=1e-5)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_trainable_weights_round_trip_and_record_the_checkpoint_folder(wan_files, wan_pair_batch, tmp_path, finetune):
    backend = make_wan(wan_files, finetune=finetune)
    train_steps(dpo_module(backend, lr=1e-2), wan_pair_batch, 1, seed=2)
    out = backend.save_trainable(tmp_path / "w")
    meta = json.loads((out / "trainable.json").read_text())
    assert (meta["family"], meta["finetune"], meta["base"], meta["trained"]) == (
        "wan_videotuna", finetune, str(wan_files["ckpt"]), ["denoiser"])
    again = make_wan(wan_files, finetune=finetune, trainable_weights=str(out))
    for (n, a), b in zip(backend.denoiser.state_dict().items(), again.denoiser.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(UserError, match="model.finetune"):
        make_wan(wan_files, finetune="full" if finetune == "lora" else "lora", trainable_weights=str(out))


def test_a_trained_denoiser_checkpoint_replaces_the_folder_s_weights(wan_files, tmp_path):
    from videotuna.models.wan.wan.modules.model import WanModel

    state = {k: torch.full_like(v, 0.01) for k, v in WanModel.from_pretrained(wan_files["ckpt"]).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "denoiser.ckpt")  # VideoTuna's --trained_ckpt, loaded by the host
    backend = make_wan(wan_files, denoiser_ckpt=str(tmp_path / "denoiser.ckpt"))
    assert torch.equal(backend.denoiser.head.head.weight, state["head.head.weight"])
    assert torch.equal(backend.denoiser.blocks[0].ffn[0].base_layer.weight, state["blocks.0.ffn.0.weight"])
    with pytest.raises(UserError, match="model.denoiser_ckpt=.*no such file"):
        make_wan(wan_files, denoiser_ckpt=str(tmp_path / "missing.ckpt"))


def test_generate_samples_each_prompt_with_its_own_seed(wan_files):
    backend = make_wan(wan_files)
    kw = dict(num_frames=5, steps=3, guidance=5.0, height=32, width=32)
    both = backend.generate(["a red square", "a dog"], seed=[7, 8], **kw)
    alone = backend.generate(["a dog"], seed=[8], **kw)
    assert both.shape == (2, 5, 3, 32, 32) and 0 <= both.min() and both.max() <= 1
    assert torch.allclose(both[1], alone[0], atol=1e-6)
    assert not torch.allclose(both[0], backend.generate(["a red square"], seed=[9], **kw)[0], atol=1e-4)
    assert backend.denoiser.training  # the sampler's eval mode is undone
    with pytest.raises(UserError, match="4n\\+1 frames"):
        backend.generate(["a dog"], seed=0, num_frames=8, steps=1, height=32, width=32)


def test_generate_is_the_hosts_sampler_loop(wan_files):
    """With guidance 1 the sampler is plain Euler steps of Wan's scheduler on the policy's velocity."""
    from videotuna.models.wan.wan.utils.fm_solvers_unipc import FlowUniPCMultistepScheduler

    backend = make_wan(wan_files, sample_shift=3.0)
    video = backend.generate(["a dog"], seed=[4], num_frames=5, steps=2, guidance=1.0, height=32, width=32)
    net = backend.denoiser.eval()
    latent = torch.randn((16, 2, 4, 4), generator=torch.Generator().manual_seed(4))
    context = backend.encode_prompt(["a dog"])[0]
    sampler = FlowUniPCMultistepScheduler(shift=1)
    sampler.set_timesteps(2, shift=3.0)
    with torch.no_grad():
        for t in sampler.timesteps:
            v = net([latent], t=t.reshape(1), context=[context])[0]
            latent = sampler.step(v[None], t, latent[None], return_dict=False)[0][0]
        expected = (backend.decode_latents(latent[None])[0] + 1) / 2
    assert torch.allclose(video[0], expected.clamp(0, 1).permute(1, 0, 2, 3), atol=1e-5)


def test_a_checkpoint_folder_lacking_a_file_is_named(wan_files, tmp_path):
    import shutil

    folder = tmp_path / "Wan2.1-T2V-1.3B"
    shutil.copytree(wan_files["ckpt"], folder)
    (folder / "Wan2.1_VAE.pth").unlink()
    section = OmegaConf.to_container(OmegaConf.create(wan_files["section"]))
    with pytest.raises(UserError, match="ckpt_path=.*Wan2.1-T2V-1.3B: not a t2v-1.3B checkpoint folder; missing "
                                        "Wan2.1_VAE.pth"):
        make_wan({"section": section, "ckpt": folder})


def test_a_flow_that_carries_its_own_lora_config_is_refused(wan_files):
    section = OmegaConf.to_container(OmegaConf.create(wan_files["section"]))
    section["params"]["lora_config"] = {"target": "peft.LoraConfig", "params": {"r": 16}}
    with pytest.raises(UserError, match="lora_config: drop it and set model.finetune=lora"):
        make_wan({"section": section, "ckpt": wan_files["ckpt"]})


def test_without_text_and_vae_the_denoiser_trains_from_cached_latents_only(wan_files):
    backend = make_wan(wan_files, load_text_and_vae=False)
    with pytest.raises(UserError, match="model.load_text_and_vae=false"):
        backend.encode_prompt(["a dog"])
    assert backend.trainable_parameters()
