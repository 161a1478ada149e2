import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_backend
from videotuna_dpo.checkpoint_io import UntrustedCheckpointError, load_weights
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import Backend


def _inputs(backend, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    latents = backend.encode_video(pixels)
    cond = backend.encode_prompt(["a red square moving right", "a cat"])
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 900])
    return latents, noise, t, cond


def _perturb_lora(backend, scale=0.5):
    with torch.no_grad():
        for name, p in backend.transformer.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)


def test_loads_from_diffusers_layout_and_follows_the_protocol(tiny_cogvideox):
    backend = make_backend(tiny_cogvideox)
    assert isinstance(backend, Backend)
    latents, noise, t, cond = _inputs(backend)
    # 9 frames of 32x32 -> [B, 3 latent frames, 4 channels, 8, 8]
    assert latents.shape == (2, 3, 4, 8, 8)
    assert cond.shape == (2, 16, 32)
    assert backend.prediction_type == "v_prediction"
    noisy = backend.add_noise(latents, noise, t)
    a = backend.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    assert torch.allclose(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-5)
    assert torch.allclose(backend.target(latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-5)
    assert backend.predict(noisy, t, cond).shape == latents.shape


def test_missing_subfolders_are_named(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(UserError, match=r"missing subfolder\(s\) vae, text_encoder, tokenizer, scheduler"):
        make_backend(tmp_path)


def test_lora_reference_is_the_base_network_without_a_second_copy(tiny_cogvideox):
    backend = make_backend(tiny_cogvideox)
    latents, noise, t, cond = _inputs(backend)
    noisy = backend.add_noise(latents, noise, t)
    base = backend.predict(noisy, t, cond).detach()
    _perturb_lora(backend)
    tuned = backend.predict(noisy, t, cond).detach()
    assert not torch.allclose(base, tuned, atol=1e-4)
    with backend.reference() as reference:
        assert torch.allclose(reference(noisy, t, cond), base, atol=1e-6)
    assert torch.allclose(backend.predict(noisy, t, cond), tuned, atol=1e-6), "adapters re-enabled after"
    # Storage: exactly one transformer (base + LoRA) plus VAE and T5, no reference copy.
    fresh = make_backend(tiny_cogvideox, finetune="full")
    transformer_numel = sum(p.numel() for n, p in fresh.transformer.named_parameters())
    lora_numel = sum(p.numel() for n, p in backend.transformer.named_parameters() if "lora_" in n)
    other = sum(p.numel() for p in backend.vae.parameters()) + sum(p.numel() for p in backend.text_encoder.parameters())
    storages = {p.untyped_storage().data_ptr(): p.numel() for p in backend.parameters()}
    assert sum(storages.values()) == transformer_numel + lora_numel + other
    assert backend.ref_denoiser is None and not backend._ref_cpu
    assert {n for n, p in backend.named_parameters() if p.requires_grad} == {
        n for n, _ in backend.named_parameters() if "lora_" in n
    }


@pytest.mark.parametrize("on_cpu", [False, True])
def test_full_finetune_reference_is_a_frozen_copy(tiny_cogvideox, on_cpu):
    backend = make_backend(tiny_cogvideox, finetune="full", reference_on_cpu=on_cpu)
    latents, noise, t, cond = _inputs(backend)
    noisy = backend.add_noise(latents, noise, t)
    base = backend.predict(noisy, t, cond).detach()
    with torch.no_grad():
        for p in backend.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    with backend.reference() as reference:
        assert torch.allclose(reference(noisy, t, cond), base, atol=1e-5)
    reference_module = backend._ref_cpu["transformer"] if on_cpu else backend.ref_denoiser
    assert all(not p.requires_grad for p in reference_module.parameters())
    in_module = {id(p) for p in backend.parameters()}
    # On CPU the copy stays outside the module, so Lightning never moves it to the GPU.
    assert any(id(p) in in_module for p in reference_module.parameters()) is (not on_cpu)


def test_lora_weights_roundtrip_and_generate_with_them(tiny_cogvideox, tmp_path):
    backend = make_backend(tiny_cogvideox)
    _perturb_lora(backend, 0.2)
    out = backend.save_trainable(tmp_path / "w")
    meta = json.loads((out / "trainable.json").read_text())
    assert meta["finetune"] == "lora" and meta["lora"]["rank"] == 4
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    loaded = make_backend(tiny_cogvideox, trainable_weights=str(out))
    for (n1, p1), (n2, p2) in zip(backend.transformer.named_parameters(), loaded.transformer.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    base_video = make_backend(tiny_cogvideox).generate(["a red square"], num_frames=9, steps=2, guidance=1.0, seed=3)
    tuned_video = loaded.generate(["a red square"], num_frames=9, steps=2, guidance=1.0, seed=3)
    assert tuned_video.shape == (1, 9, 3, 32, 32)
    assert 0 <= tuned_video.min() and tuned_video.max() <= 1
    assert not torch.allclose(base_video, tuned_video), "the tuned weights change the samples"


def test_full_weights_roundtrip(tiny_cogvideox, tmp_path):
    backend = make_backend(tiny_cogvideox, finetune="full")
    with torch.no_grad():
        backend.transformer.proj_out.weight.add_(1.0)
    backend.save_trainable(tmp_path / "w")
    loaded = make_backend(tiny_cogvideox, finetune="full", trainable_weights=str(tmp_path / "w"))
    assert torch.equal(loaded.transformer.proj_out.weight, backend.transformer.proj_out.weight)
    with pytest.raises(UserError, match="holds 'full' weights but model.finetune is 'lora'"):
        make_backend(tiny_cogvideox, trainable_weights=str(tmp_path / "w"))


def test_generate_is_deterministic_per_seed(tiny_cogvideox):
    backend = make_backend(tiny_cogvideox)
    a = backend.generate(["a red square", "a blue square"], num_frames=9, steps=2, guidance=2.0, seed=7)
    b = backend.generate(["a red square", "a blue square"], num_frames=9, steps=2, guidance=2.0, seed=7)
    assert a.shape == (2, 9, 3, 32, 32) and torch.equal(a, b)


class Opaque:
    """A Python object that only full unpickling can rebuild."""


def test_pickled_checkpoints_are_refused_unless_trusted(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(load_weights(tmp_path / "plain.pt", "model.trust_pickles")["w"], torch.ones(2))
    torch.save({"w": torch.ones(2), "obj": Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(UntrustedCheckpointError) as info:
        load_weights(tmp_path / "pickled.pt", "model.trust_pickles")
    assert "pickled.pt" in str(info.value) and "`model.trust_pickles=true`" in str(info.value)
    assert load_weights(tmp_path / "pickled.pt", "model.trust_pickles", trusted=True)["w"].sum() == 2


def test_weights_of_another_family_or_rank_are_refused(tiny_cogvideox, tmp_path):
    backend = make_backend(tiny_cogvideox)
    out = backend.save_trainable(tmp_path / "w")
    meta = json.loads((out / "trainable.json").read_text())
    (out / "trainable.json").write_text(json.dumps({**meta, "family": "toy"}))
    with pytest.raises(UserError, match="weights of model family 'toy', not 'cogvideox'; set model.name"):
        backend.load_trainable(out)
    (out / "trainable.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"LoRA rank 4 but model.lora.rank=8"):
        make_backend(tiny_cogvideox, lora={"rank": 8, "alpha": 8}, trainable_weights=str(out))


@pytest.mark.parametrize("sft", ["lora", "full"])
def test_init_weights_make_the_sft_model_the_reference(tiny_cogvideox, tmp_path, sft):
    base = make_backend(tiny_cogvideox, finetune=sft)
    with torch.no_grad():
        for p in base.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base.save_trainable(tmp_path / "sft")
    x = torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([100, 700])
    cond = base.encode_prompt(["a red square", "a dog"])
    with torch.no_grad():
        want = base.predict(x, t, cond)
    dpo = make_backend(tiny_cogvideox, init_weights=str(tmp_path / "sft"))  # a fresh LoRA over the SFT model
    with torch.no_grad(), dpo.reference() as reference:
        assert torch.allclose(reference(x, t, cond), want, atol=1e-5)
        assert torch.allclose(dpo.predict(x, t, cond), want, atol=1e-5)
    with torch.no_grad():
        plain = make_backend(tiny_cogvideox).predict(x, t, cond)
    assert not torch.allclose(plain, want, atol=1e-4)  # without init_weights the reference is the base


class WritesOnUnpickle:
    """Unpickling this object creates ``path``: proof that loading ran code from the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


BIN_NAMES = {"model.safetensors": "pytorch_model.bin",  # the names diffusers / transformers / our LoRA look for
             "diffusion_pytorch_model.safetensors": "diffusion_pytorch_model.bin",
             "pytorch_lora_weights.safetensors": "pytorch_lora_weights.bin"}


def _safetensors_to_pickled_bin(folder, marker):
    """Replace ``folder``'s safetensors file by a torch ``.bin`` of the same tensors plus a code-running object."""
    [source] = folder.glob("*.safetensors")
    state = {**load_file(source), "payload": WritesOnUnpickle(marker)}
    source.unlink()
    torch.save(state, folder / BIN_NAMES[source.name])
    return folder / BIN_NAMES[source.name]


@pytest.mark.parametrize("subfolder", ["transformer", "text_encoder"])
def test_a_pickled_bin_in_pretrained_is_refused_by_name_without_running_it(tiny_cogvideox, tmp_path, subfolder):
    root = tmp_path / "CogVideoX-tiny"
    shutil.copytree(tiny_cogvideox, root)
    marker = tmp_path / "code-ran"
    pickled = _safetensors_to_pickled_bin(root / subfolder, marker)
    with pytest.raises(UserError) as info:
        make_backend(root)
    message = str(info.value)
    assert message.startswith(f"model.pretrained={root}: cannot load the weights in {root / subfolder} (")
    assert f"{pickled} is a pickled file, loaded only if it holds nothing but tensors" in message
    assert message.endswith("save the weights as safetensors (save_pretrained(..., safe_serialization=True) or "
                            "safetensors.torch.save_file)")
    assert not marker.exists()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_pickled_bin_in_trainable_weights_is_refused_by_name_without_running_it(tiny_cogvideox, tmp_path, finetune):
    weights = make_backend(tiny_cogvideox, finetune=finetune).save_trainable(tmp_path / "w")
    folder = weights if finetune == "lora" else weights / "transformer"
    marker = tmp_path / "code-ran"
    pickled = _safetensors_to_pickled_bin(folder, marker)
    with pytest.raises(UserError) as info:
        make_backend(tiny_cogvideox, finetune=finetune, trainable_weights=str(weights))
    message = str(info.value)
    start = f"{weights}: no pytorch_lora_weights.safetensors" if finetune == "lora" else \
        f"model.trainable_weights={weights}: cannot load the weights in {folder} ("
    assert message.startswith(start)
    assert f"it holds {pickled}, a pickled file, which a weights folder never loads (unpickling can run code)" in message
    assert not marker.exists()
