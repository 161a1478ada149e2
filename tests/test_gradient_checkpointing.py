"""Gradient checkpointing on every backend: the config switch reaches the network, and the gradients stay the same."""

import pytest
import torch
import torch.utils.checkpoint
from omegaconf import OmegaConf

from tests.test_conformance import PROMPTS, RECIPES
from videotuna_dpo.data.order import seeded
from videotuna_dpo.errors import UserError
from videotuna_dpo.registry import Registry
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

# The switch of each backend: VideoTuna's Wan keeps the host's own name (WanModel.forward's activation_checkpointing).
SWITCH = {"wan_videotuna": "activation_checkpointing"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpointing_models")


def _pair_batch(frames: int) -> dict:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, frames, 32, 32, generator=g) * 2 - 1
    return {"winner": pixels[:2], "loser": pixels[2:], "caption": PROMPTS, "weight": torch.ones(2)}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_the_checkpointing_switch_reaches_every_backend_s_network_and_leaves_the_gradients(recipe, models, monkeypatch):
    name, model, _, _, _, extras = RECIPES[recipe]
    block = model(models)
    switch = SWITCH.get(recipe, "gradient_checkpointing")
    batch = _pair_batch(extras.get("data", {}).get("video_length", 4))
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    grads, losses = {}, {}
    for enabled in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        backend = Registry.load(["dpo"]).get("model", name).from_config(OmegaConf.create({**block, switch: enabled}))
        module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=500.0)), OmegaConf.structured(OptimizerSchema()))
        module.train()
        calls.clear()
        with seeded("checkpointing", 0):
            out, _ = module.dpo_step(batch)
        assert bool(calls) is enabled, f"{recipe}: {switch}={enabled} but {len(calls)} checkpointed call(s)"
        out.loss.backward()
        losses[enabled] = out.loss.item()
        grads[enabled] = [p.grad.clone() for p in backend.trainable_parameters()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert len(grads[True]) == len(grads[False]) and any(g.abs().sum() > 0 for g in grads[False])
    for with_checkpoints, without in zip(grads[True], grads[False]):
        assert torch.allclose(with_checkpoints, without, rtol=1e-4, atol=1e-7)


def test_vc2_follows_the_host_config_unless_the_switch_is_set(models):
    from tests.test_conformance import _vc2_model
    from videotuna_dpo.models.videocrafter import VideoCrafter2Backend

    block = _vc2_model(models, "videocrafter2")
    block["flow"]["params"]["denoiser_config"]["params"]["use_checkpoint"] = True  # as VideoTuna's VC2 config ships
    switches = lambda b: {getattr(m, n) for m in b.flow.denoiser.modules() for n in ("use_checkpoint", "checkpoint")  # noqa: E731
                          if isinstance(getattr(m, n, None), bool)}
    host = VideoCrafter2Backend.from_config(OmegaConf.create(block))
    assert host.gradient_checkpointing and switches(host) == {True}
    off = VideoCrafter2Backend.from_config(OmegaConf.create({**block, "gradient_checkpointing": False}))
    assert not off.gradient_checkpointing and switches(off) == {False}


def test_a_denoiser_without_checkpointing_is_refused_by_name(models, monkeypatch):
    from videotuna_dpo.toy.model import ToyVideoUNet

    monkeypatch.setattr(ToyVideoUNet, "_supports_gradient_checkpointing", False)
    with pytest.raises(UserError, match=r"model.gradient_checkpointing: ToyBackend's unet \(ToyVideoUNet\) cannot "
                                        r"recompute its activations; set model.gradient_checkpointing=false"):
        Registry.load(["dpo"]).get("model", "toy").from_config(OmegaConf.create({"name": "toy",
                                                                                "gradient_checkpointing": True}))
