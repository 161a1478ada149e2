"""VC2 through the VideoTuna stand-in: host-equivalent eps loss with input scaling, DPO, checkpoints, DDIM sampling."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.videotuna_fixtures import dpo_module, make_vc2, pair_batch, train_steps, use_standin, vc2_files  # noqa: F401
from videotuna_dpo.checkpoint_io import UntrustedCheckpointError
from videotuna_dpo.errors import UserError


class Marker:
    """A non-tensor object pickled into a checkpoint: weights_only refuses it."""


def test_noising_applies_vc2_input_scaling_exactly_as_the_host_forward(vc2_files):
    backend = make_vc2(vc2_files)
    flow = backend.flow
    flow.denoiser.eval()  # VC2's temporal dropout off, so both losses see the same network
    x0 = torch.randn(3, 4, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 399, 999])
    a = flow.scheduler.alphas_cumprod[t].reshape(3, 1, 1, 1, 1)
    scale = torch.tensor([1.0, 0.7, 0.7]).reshape(3, 1, 1, 1, 1)  # linspace(1, 0.7, 400) then 0.7
    expected = a.sqrt() * scale * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(backend.add_noise(x0, noise, t), expected, atol=1e-6)
    assert torch.equal(backend.target(x0, noise, t), noise)  # eps
    cond = backend.encode_prompt(["a red square", "a dog", "up"])
    with torch.no_grad():
        host_loss, _ = flow(x0, cond, t=t, noise=noise)
        ours = (backend.predict(backend.add_noise(x0, noise, t), t, cond) - backend.target(x0, noise, t)).pow(2).mean()
    assert ours.item() == pytest.approx(host_loss.item(), rel=1e-5)


def test_v_parameterization_targets_the_scaled_input(vc2_files, tmp_path):
    from tests.videotuna_fixtures import tiny_flow_section, write_vc2_ckpt

    section = tiny_flow_section(parameterization="v")
    backend = make_vc2({"section": section, "ckpt": write_vc2_ckpt(tmp_path / "m.ckpt", section)})
    x0, noise, t = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4), torch.tensor([999])
    expected = backend.flow.scheduler.get_v(0.7 * x0, noise, t)
    assert torch.allclose(backend.target(x0, noise, t), expected, atol=1e-6)


def test_latent_and_condition_layouts(vc2_files, pair_batch):
    backend = make_vc2(vc2_files)
    latents = backend.encode_video(pair_batch["winner"])
    assert latents.shape == (2, 4, 4, 4, 4)  # [B, C, F, H/8, W/8]
    assert backend.encode_prompt(list(pair_batch["caption"])).shape == (2, 8, 32)


@pytest.mark.parametrize("share", [True, False])
def test_dpo_on_vc2_shares_noise_and_timestep(vc2_files, pair_batch, share):
    backend = make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4})
    calls = []
    original = backend.add_noise
    backend.add_noise = lambda x0, noise, t: calls.append((noise, t)) or original(x0, noise, t)
    torch.manual_seed(3)
    dpo_module(backend, share_noise=share).dpo_step(pair_batch)
    (noise, t), = calls
    noise_w, noise_l = noise.chunk(2)
    t_w, t_l = t.chunk(2)
    assert torch.equal(noise_w, noise_l) is share
    assert torch.equal(t_w, t_l) is share or not share


def test_full_finetune_trains_only_the_denoiser_and_the_reference_copy_stays_frozen(vc2_files, pair_batch):
    backend = make_vc2(vc2_files)
    module = dpo_module(backend)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"backend.flow.denoiser." + n for n, _ in backend.flow.denoiser.named_parameters()}
    train_steps(module, pair_batch, 2, seed=1)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable and len(changed) >= len(trainable) // 2
    assert all(torch.equal(p, before["backend.ref_denoisers.denoiser." + n]) and p.grad is None
               for n, p in backend.ref_denoiser.named_parameters())


def test_reference_is_deterministic_and_equals_the_policy_at_the_start(vc2_files, pair_batch):
    for overrides in ({}, {"finetune": "lora", "lora": {"rank": 4, "alpha": 4}}):
        backend = make_vc2(vc2_files, **overrides)
        z = backend.encode_video(pair_batch["winner"])
        t, cond = torch.tensor([10, 900]), backend.encode_prompt(list(pair_batch["caption"]))
        noisy = backend.add_noise(z, torch.randn_like(z), t)
        backend.train()  # as the Trainer leaves it: VC2's temporal dropout active in the policy
        with torch.no_grad():
            with backend.reference() as reference:
                ref = reference(noisy, t, cond)
                assert torch.equal(ref, reference(noisy, t, cond))  # no dropout in the reference
            assert backend.flow.denoiser.training
            assert not torch.allclose(backend.predict(noisy, t, cond), backend.predict(noisy, t, cond))
            backend.eval()
            assert torch.allclose(ref, backend.predict(noisy, t, cond), atol=1e-6)


def test_lora_reference_is_the_base_with_adapters_disabled(vc2_files, pair_batch):
    backend = make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4})
    base = make_vc2(vc2_files)
    module = dpo_module(backend)
    train_steps(module, pair_batch, 2, seed=2)
    assert all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    z = backend.encode_video(pair_batch["winner"])
    t, cond = torch.tensor([5, 500]), backend.encode_prompt(list(pair_batch["caption"]))
    noisy = backend.add_noise(z, torch.randn_like(z), t)
    backend.eval(), base.eval()
    with torch.no_grad(), backend.reference() as reference:
        ref = reference(noisy, t, cond)
    with torch.no_grad():
        assert torch.allclose(ref, base.predict(noisy, t, cond), atol=1e-5)
        assert not torch.allclose(ref, backend.predict(noisy, t, cond), atol=1e-5)


def test_reference_on_cpu_moves_in_for_the_step_and_back(vc2_files, pair_batch):
    backend = make_vc2(vc2_files, reference_on_cpu=True)
    assert backend.ref_denoiser is None and list(backend._ref_cpu) == ["denoiser"]
    assert not any(p is q for p in backend.parameters() for q in backend._ref_cpu["denoiser"].parameters())
    backend.flow.denoiser.eval()
    out, used = dpo_module(backend).dpo_step(pair_batch)
    assert torch.allclose(used["ref_err_w"], used["model_err_w"]) and out.reward_margin.abs().item() < 1e-6


def test_overfitting_two_pairs_drives_implicit_accuracy_to_one(vc2_files, pair_batch):
    backend = make_vc2(vc2_files, finetune="lora", lora={"rank": 8, "alpha": 8})
    backend.flow.denoiser.eval()  # fixed network as well as fixed noise: a classic overfit check
    module = dpo_module(backend, beta=2000.0, lr=4e-3)
    torch.manual_seed(123)
    start, _ = module.dpo_step(pair_batch)
    assert start.loss.item() == pytest.approx(0.6931, abs=1e-3)
    train_steps(module, pair_batch, 12, seed=123)
    torch.manual_seed(123)
    end, _ = module.dpo_step(pair_batch)
    assert end.implicit_acc.item() == 1.0 and end.reward_margin.item() > 1.0 and end.loss.item() < start.loss.item() / 2


def test_pickled_checkpoint_is_refused_unless_trusted(vc2_files, tmp_path):
    state = torch.load(vc2_files["ckpt"], weights_only=True)
    state["marker"] = Marker()
    path = tmp_path / "model.ckpt"
    torch.save(state, path)
    with pytest.raises(UntrustedCheckpointError) as err:
        make_vc2(vc2_files, ckpt=str(path))
    assert str(path) in str(err.value) and "model.trust_checkpoint=true" in str(err.value)
    trusted = make_vc2(vc2_files, ckpt=str(path), trust_checkpoint=True)
    reference = make_vc2(vc2_files)
    assert all(torch.equal(a, b) for a, b in zip(trusted.flow.denoiser.state_dict().values(),
                                                  reference.flow.denoiser.state_dict().values()))


def test_videotuna_split_folder_loads_the_same_weights(vc2_files, tmp_path):
    state = torch.load(vc2_files["ckpt"], weights_only=True)["state_dict"]
    for name, prefix in (("denoiser", "model.diffusion_model."), ("first_stage_model", "first_stage_model."),
                         ("cond_stage_model", "cond_stage_model.")):
        torch.save({"state_dict": {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}},
                   tmp_path / f"{name}.ckpt")
    split, single = make_vc2(vc2_files, ckpt=str(tmp_path)), make_vc2(vc2_files)
    for a, b in ((split.flow.first_stage_model, single.flow.first_stage_model), (split.flow.denoiser, single.flow.denoiser)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    (tmp_path / "cond_stage_model.ckpt").unlink()
    with pytest.raises(UserError, match="lacks cond_stage_model.ckpt"):
        make_vc2(vc2_files, ckpt=str(tmp_path))


def test_trainable_weights_round_trip(vc2_files, pair_batch, tmp_path):
    backend = make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4})
    train_steps(dpo_module(backend), pair_batch, 1, seed=4)
    backend.save_trainable(tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["pytorch_lora_weights.safetensors", "trainable.json"]
    keys = load_file(str(tmp_path / "w" / "pytorch_lora_weights.safetensors"))
    assert len(keys) == 16 and all(k.startswith("denoiser.") and ".lora_" in k for k in keys)  # 8 layers, A and B
    again = make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4}, trainable_weights=str(tmp_path / "w"))
    trained = dict(backend.flow.denoiser.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in again.flow.denoiser.named_parameters() if "lora_" in n)
    with pytest.raises(UserError, match="model.finetune"):
        make_vc2(vc2_files, trainable_weights=str(tmp_path / "w"))


def test_generate_runs_the_hosts_ddim_sampler_with_the_papers_defaults(vc2_files, monkeypatch):
    from videotuna.schedulers.ddim import DDIMSampler

    backend = make_vc2(vc2_files)
    seen = {}
    original = DDIMSampler.sample

    def spy(self, S, batch_size, shape, conditioning=None, eta=0.0, **kwargs):
        seen.update(S=S, eta=eta, scale=kwargs["unconditional_guidance_scale"], fps=conditioning["fps"].tolist())
        return original(self, S, batch_size, shape, conditioning=conditioning, eta=eta, **kwargs)

    monkeypatch.setattr(DDIMSampler, "sample", spy)
    video = backend.generate(["a red square", "a dog"], num_frames=4, seed=7)
    assert seen == {"S": 50, "eta": 1.0, "scale": 12.0, "fps": [28]}  # one sampler call per seed
    assert video.shape == (2, 4, 3, 32, 32) and 0.0 <= video.min() and video.max() <= 1.0
    assert torch.equal(video, backend.generate(["a red square", "a dog"], num_frames=4, seed=7))
    assert not torch.equal(video, backend.generate(["a red square", "a dog"], num_frames=4, seed=8))


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_in_the_training_step_so_the_first_loss_is_log_2(vc2_files, pair_batch, disable):
    import math

    backend = make_vc2(vc2_files)
    module = dpo_module(backend, beta=5000.0, disable_dropout=disable)
    module.train()  # as the Trainer leaves it: VC2's temporal convolutions carry dropout 0.1
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        out, _ = module.dpo_step(pair_batch)
        losses.append(out.loss.item())
    if disable:
        assert losses == [pytest.approx(math.log(2), abs=1e-6)] * 2
    else:  # dropout noise times beta / 2: the loss is far from log 2 and changes with the dropout draw
        assert abs(losses[0] - math.log(2)) > 1e-2


def test_init_weights_merge_an_sft_lora_into_the_base_which_becomes_the_reference(vc2_files, pair_batch, tmp_path):
    lora = {"finetune": "lora", "lora": {"rank": 4, "alpha": 4}}
    sft = make_vc2(vc2_files, **lora)
    with torch.no_grad():
        for name, p in sft.flow.denoiser.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.2)
    sft.save_trainable(tmp_path / "sft")
    sft.eval()
    z = sft.encode_video(pair_batch["winner"])
    t, cond = torch.tensor([10, 900]), sft.encode_prompt(list(pair_batch["caption"]))
    noisy = sft.add_noise(z, torch.randn_like(z), t)
    with torch.no_grad():
        want = sft.predict(noisy, t, cond)
    for finetune in ({"finetune": "full"}, lora):
        dpo = make_vc2(vc2_files, init_weights=str(tmp_path / "sft"), **finetune).eval()
        with torch.no_grad(), dpo.reference() as reference:
            assert torch.allclose(reference(noisy, t, cond), want, atol=1e-5)  # the SFT model, not the base
            assert torch.allclose(dpo.predict(noisy, t, cond), want, atol=1e-5)  # policy == reference at start
        assert not any(n.endswith("lora_A.init.weight") for n, _ in dpo.flow.denoiser.named_parameters())
    dpo.save_trainable(tmp_path / "dpo")
    assert json.loads((tmp_path / "dpo" / "trainable.json").read_text())["init_weights"] == str((tmp_path / "sft").resolve())
    with pytest.raises(UserError, match="trained on top of model.init_weights="):
        make_vc2(vc2_files, trainable_weights=str(tmp_path / "dpo"), **lora)  # without the SFT weights under it


class Payload:
    """Unpickling it calls os.system: torch's weights-only loader blocks the call by another wording."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_calls_os_system_is_refused_naming_the_trust_switch_and_never_runs(vc2_files, tmp_path):
    state = torch.load(vc2_files["ckpt"], weights_only=True)
    marker = tmp_path / "ran"
    state["payload"] = Payload(marker)
    path = tmp_path / "model.ckpt"
    torch.save(state, path)
    with pytest.raises(UntrustedCheckpointError) as err:
        make_vc2(vc2_files, ckpt=str(path))
    assert str(path) in str(err.value) and "model.trust_checkpoint=true" in str(err.value)
    assert not marker.exists()


VC2_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def write_old_vc2_lora(vc2_files, directory, seed=5):
    """A LoRA folder exactly as the VC2 backend wrote it up to edad179, built from peft as that code did: the UNet
    wrapped by ``get_peft_model`` (rank 4), ``denoiser_lora.safetensors`` = ``get_peft_model_state_dict`` of the
    wrapper (keys ``base_model.model.<layer>.lora_A.weight``), ``trainable.json`` without ``trained``.

    Returns the wrapper, its adapters set to seeded random values (a trained LoRA's, not peft's zero init).
    """
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(make_vc2(vc2_files).flow.denoiser)
    wrapper = get_peft_model(unet, LoraConfig(r=4, lora_alpha=4.0, lora_dropout=0.0, target_modules=VC2_ATTENTION,
                                              init_lora_weights=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    directory.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(wrapper).items()},
              str(directory / "denoiser_lora.safetensors"))
    meta = {"family": "videocrafter2", "finetune": "lora", "base": str(vc2_files["ckpt"]), "init_weights": None,
            "lora": {"rank": 4, "alpha": 4.0, "target_modules": VC2_ATTENTION}}
    (directory / "trainable.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return wrapper.eval()


def test_a_lora_folder_written_by_the_old_vc2_backend_loads_to_identical_weights(vc2_files, pair_batch, tmp_path):
    old = write_old_vc2_lora(vc2_files, tmp_path / "old")
    old_keys = load_file(str(tmp_path / "old" / "denoiser_lora.safetensors"))
    assert len(old_keys) == 16 and all(k.startswith("base_model.model.") for k in old_keys)
    new = make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4}, trainable_weights=str(tmp_path / "old"))
    loaded = {n: p for n, p in new.flow.denoiser.named_parameters() if "lora_" in n}
    want = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in old_keys.items()}
    assert sorted(loaded) == sorted(want)  # every adapter of the model came from the file, none left at init
    assert all(torch.equal(loaded[n], want[n]) for n in want)
    new.eval()
    z = new.encode_video(pair_batch["winner"])
    t, cond = torch.tensor([10, 900]), new.encode_prompt(list(pair_batch["caption"]))
    noisy = new.add_noise(z, torch.randn_like(z), t)
    host = make_vc2(vc2_files).eval().flow
    host.model.diffusion_model = old  # the old backend's policy: the host calling the peft wrapper
    with torch.no_grad():
        assert torch.equal(new.predict(noisy, t, cond), host.apply_model(noisy, t, cond).float())
    # As model.init_weights (an SFT LoRA of the old layout) it is merged into the base, which becomes the reference.
    dpo = make_vc2(vc2_files, init_weights=str(tmp_path / "old")).eval()
    with torch.no_grad(), dpo.reference() as reference:
        assert torch.allclose(reference(noisy, t, cond), host.apply_model(noisy, t, cond).float(), atol=1e-5)


def test_a_lora_folder_without_either_file_name_says_both(vc2_files, tmp_path):
    write_old_vc2_lora(vc2_files, tmp_path / "w")
    (tmp_path / "w" / "denoiser_lora.safetensors").unlink()
    with pytest.raises(UserError) as err:
        make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4}, trainable_weights=str(tmp_path / "w"))
    assert str(err.value) == (f"{tmp_path / 'w'}: no pytorch_lora_weights.safetensors or denoiser_lora.safetensors; "
                              f"point at a run's weights/last or weights/step-N folder")


def test_full_weights_are_the_unet_state_dict_in_denoiser_safetensors_as_before(vc2_files, tmp_path):
    backend = make_vc2(vc2_files)
    with torch.no_grad():
        for p in backend.flow.denoiser.parameters():
            p.add_(0.01)
    backend.save_trainable(tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["denoiser.safetensors", "trainable.json"]
    state = {k: v.detach().clone() for k, v in backend.flow.denoiser.state_dict().items()}
    saved = load_file(str(tmp_path / "new" / "denoiser.safetensors"))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    # The old backend's full folder: the same file, trainable.json without "trained".
    (tmp_path / "old").mkdir()
    save_file(state, str(tmp_path / "old" / "denoiser.safetensors"))
    (tmp_path / "old" / "trainable.json").write_text(json.dumps(
        {"base": str(vc2_files["ckpt"]), "family": "videocrafter2", "finetune": "full", "init_weights": None}))
    for folder in ("new", "old"):
        again = make_vc2(vc2_files, trainable_weights=str(tmp_path / folder))
        assert all(torch.equal(v, state[k]) for k, v in again.flow.denoiser.state_dict().items())
    del state["out.2.bias"]
    save_file(state, str(tmp_path / "old" / "denoiser.safetensors"))
    with pytest.raises(UserError, match=r"denoiser.safetensors: does not match UNetModel \(missing \['out.2.bias'\]"):
        make_vc2(vc2_files, trainable_weights=str(tmp_path / "old"))
