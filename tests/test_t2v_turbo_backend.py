"""T2V-Turbo on the VideoTuna stand-in: DDIM-grid timesteps, LoRA-only reference, unet_lora.pt I/O, LCM sampling."""

import pytest
import torch

from tests.videotuna_fixtures import dpo_module, make_turbo, make_vc2, pair_batch, train_steps, vc2_files  # noqa: F401
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.t2v_turbo import PairedLoRA


def test_training_timesteps_always_lie_on_the_50_step_ddim_grid(vc2_files):
    backend = make_turbo(vc2_files)
    torch.manual_seed(0)
    t = backend.sample_timesteps(4000, "cpu")
    grid = set(range(19, 1000, 20))
    assert set(t.tolist()) <= grid and len(set(t.tolist())) == 50
    assert backend.ddim_timesteps[0].item() == 19 and backend.ddim_timesteps[-1].item() == 999


def test_reference_holds_adapter_weights_only(vc2_files):
    backend = make_turbo(vc2_files)
    vc2 = make_vc2(vc2_files, finetune="lora", lora={"rank": 4, "alpha": 4})
    assert not hasattr(backend, "ref_denoiser") or backend.ref_denoiser is None
    trainable, reference = backend.trainable_parameters(), backend.reference_parameters()
    policy = [p for layer in backend._lora_layers() for p in (layer.lora_up.weight, layer.lora_down.weight)]
    assert [p.shape for p in policy] == [p.shape for p in reference]
    assert all(not p.requires_grad for p in reference) and all(p.requires_grad for p in trainable)
    adapters = sum(p.numel() for p in policy)
    base_unet = sum(p.numel() for n, p in vc2.flow.denoiser.named_parameters() if "lora_" not in n)
    time_cond_proj = 256 * 32
    unet_total = sum(p.numel() for p in backend.flow.denoiser.parameters())
    assert unet_total == base_unet + time_cond_proj + 2 * adapters  # one UNet, the LoRA twice
    assert len(backend.lora_names) == len(policy) // 2 and "time_cond_proj" in backend.lora_names
    assert len(trainable) == len(policy) - 2  # all but time_cond_proj's pair, which training never calls


def test_starting_policy_and_reference_are_the_loaded_turbo_lora(vc2_files, pair_batch):
    backend = make_turbo(vc2_files)
    file = torch.load(vc2_files["lora"], weights_only=True)
    layers = [m for m in backend.flow.denoiser.modules() if isinstance(m, PairedLoRA)]
    for i, layer in enumerate(layers):
        for w in (layer.lora_up.weight, layer.ref_up.weight):
            assert torch.equal(w, file[2 * i])
        for w in (layer.lora_down.weight, layer.ref_down.weight):
            assert torch.equal(w, file[2 * i + 1])
    plain = make_vc2(vc2_files)
    backend.eval(), plain.eval()
    z = backend.encode_video(pair_batch["winner"])
    t, cond = torch.tensor([19, 999]), backend.encode_prompt(list(pair_batch["caption"]))
    noisy = backend.add_noise(z, torch.randn_like(z), t)
    with torch.no_grad():
        policy = backend.predict(noisy, t, cond)
        with backend.reference() as reference:
            assert torch.allclose(reference(noisy, t, cond), policy, atol=1e-6)
        assert not torch.allclose(plain.predict(noisy, t, cond), policy, atol=1e-4)


def test_dpo_trains_only_the_policy_lora_and_the_reference_lora_stays(vc2_files, pair_batch):
    backend = make_turbo(vc2_files)
    module = dpo_module(backend)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    train_steps(module, pair_batch, 2, seed=5)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_up." in n or ".lora_down." in n for n in changed)
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if ".ref_" in n)


def test_noising_skips_vc2_input_scaling_unless_asked(vc2_files):
    x0, noise, t = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4), torch.tensor([999, 999])
    a = make_turbo(vc2_files).flow.scheduler.alphas_cumprod[999]
    assert torch.allclose(make_turbo(vc2_files).add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    scaled = make_turbo(vc2_files, input_scaling=True).add_noise(x0, noise, t)
    assert torch.allclose(scaled, a.sqrt() * 0.7 * x0 + (1 - a).sqrt() * noise, atol=1e-6)


def test_a_lora_file_for_another_unet_is_refused_by_name(vc2_files, tmp_path):
    tensors = torch.load(vc2_files["lora"], weights_only=True)
    path = tmp_path / "unet_lora.pt"
    torch.save(tensors[:-2], path)
    with pytest.raises(UserError, match="unet_lora.pt: expected T2V-Turbo's list of"):
        make_turbo(vc2_files, lora_ckpt=str(path))
    with pytest.raises(UserError, match=r"LoRA pair 0 \(layer time_embed.0\)"):
        make_turbo(vc2_files, lora_rank=2)


def test_save_trainable_writes_t2v_turbo_format_and_round_trips(vc2_files, pair_batch, tmp_path):
    backend = make_turbo(vc2_files)
    train_steps(dpo_module(backend), pair_batch, 1, seed=6)
    backend.save_trainable(tmp_path / "w")
    exported = torch.load(tmp_path / "w" / "unet_lora.pt", weights_only=True)
    policy = [t for layer in backend._lora_layers() for t in (layer.lora_up.weight, layer.lora_down.weight)]
    assert len(exported) == len(policy) and all(torch.equal(a, b) for a, b in zip(exported, policy))
    restarted = make_turbo(vc2_files, lora_ckpt=str(tmp_path / "w" / "unet_lora.pt"))
    resumed = make_turbo(vc2_files, trainable_weights=str(tmp_path / "w"))
    for a, b, c in zip(restarted.trainable_parameters(), resumed.trainable_parameters(),
                       [p for p in policy if p.requires_grad]):
        assert torch.equal(a, c) and torch.equal(b, c)
    start = torch.load(vc2_files["lora"], weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.reference_parameters(), start))  # reference = starting LoRA
    assert any(not torch.equal(a, b) for a, b in zip(policy, start))


def test_generate_uses_four_lcm_steps_and_the_guidance_embedding(vc2_files, monkeypatch):
    backend = make_turbo(vc2_files)
    seen = []
    original = backend.flow.apply_model

    def spy(x, t, cond, **kwargs):
        seen.append((t[0].item(), kwargs["fps"][0].item(), backend._w_embedding is not None))
        return original(x, t, cond, **kwargs)

    monkeypatch.setattr(backend.flow, "apply_model", spy)
    video = backend.generate(["a red square"], num_frames=4, seed=1)
    assert seen == [(999, 16, True), (759, 16, True), (519, 16, True), (279, 16, True)]
    assert video.shape == (1, 4, 3, 32, 32) and 0.0 <= video.min() and video.max() <= 1.0
    assert torch.equal(video, backend.generate(["a red square"], num_frames=4, seed=1))
    assert not torch.equal(video, backend.generate(["a red square"], num_frames=4, seed=1, guidance=1.0))


def test_the_trainable_set_is_exactly_what_receives_gradients(vc2_files, pair_batch):
    # Under DDP a trainable parameter without a gradient stops the run: time_cond_proj's LoRA is only
    # called with a guidance embedding, which training does not pass, so it must not be trainable.
    backend = make_turbo(vc2_files)
    module = dpo_module(backend)
    out, _ = module.dpo_step(pair_batch)
    out.loss.backward()
    trainable = {n for n, p in backend.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in backend.named_parameters() if p.grad is not None}
    assert trainable and trainable == with_grad
    assert not any("time_cond_proj" in n for n in trainable)
    assert len(backend.trainable_parameters()) == len(trainable)


def test_init_weights_start_policy_and_reference_from_a_previous_run(vc2_files, pair_batch, tmp_path):
    first = make_turbo(vc2_files)
    with torch.no_grad():
        for p in first.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    first.save_trainable(tmp_path / "round1")
    second = make_turbo(vc2_files, init_weights=str(tmp_path / "round1"))
    for layer_a, layer_b in zip(first._lora_layers(), second._lora_layers()):
        assert torch.equal(layer_b.ref_up.weight, layer_a.lora_up.weight)  # the reference is round 1's policy
        assert torch.equal(layer_b.lora_up.weight, layer_a.lora_up.weight)
