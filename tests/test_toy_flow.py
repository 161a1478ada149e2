"""Backend ``toy_flow``: the toy world's rectified-flow model, its schedule, sampler and Flow-DPO step."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from videotuna_dpo.errors import UserError
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema
from videotuna_dpo.toy.backend import BUILTIN, ToyBackend
from videotuna_dpo.toy.flow_backend import FLOW_BUILTIN, ToyFlowBackend

PROMPTS = ["a red square moving left", "a blue circle moving up"]


@pytest.fixture(scope="module")
def backend():
    return ToyFlowBackend.from_config(OmegaConf.create({"name": "toy_flow"}))


def _module(backend, **dpo):
    return DPOModule(backend, OmegaConf.structured(DPOSchema(**{"beta": 2000.0, **dpo})),
                     OmegaConf.structured(OptimizerSchema(lr=1e-3, weight_decay=0.0)))


def _pixels(seed: int) -> torch.Tensor:
    return torch.rand(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # [B, C, F, H, W]


def test_the_shipped_checkpoint_is_a_flow_match_euler_model_with_shift_1(backend):
    assert type(backend.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert backend.family == "toy_flow" and backend.root == FLOW_BUILTIN
    assert (backend.flow_schedule.shift, backend.flow_schedule.num_train_timesteps) == (1.0, 1000)
    training = json.loads((FLOW_BUILTIN / "training.json").read_text())
    assert training["objective"] == "flow_matching" and training["shift"] == 1.0


def test_noising_target_and_timesteps_are_the_flow_schedule_by_hand(backend):
    x0 = torch.tensor([0.5, -1.0, 0.25, 1.0]).reshape(2, 2, 1, 1, 1)  # [B=2, C=2, F=1, H=1, W=1]
    noise = torch.tensor([1.0, 2.0, -1.0, 0.0]).reshape(2, 2, 1, 1, 1)
    t = torch.tensor([250.0, 750.0])  # s = 0.25 and 0.75
    # x_t = (1 - s) x0 + s noise, per sample
    expected = torch.tensor([0.75 * 0.5 + 0.25 * 1.0, 0.75 * -1.0 + 0.25 * 2.0,
                             0.25 * 0.25 + 0.75 * -1.0, 0.25 * 1.0 + 0.75 * 0.0]).reshape(2, 2, 1, 1, 1)
    assert torch.allclose(backend.add_noise(x0, noise, t), expected)
    assert torch.equal(backend.target(x0, noise, t), torch.tensor([0.5, 3.0, -1.25, -1.0]).reshape(2, 2, 1, 1, 1))
    assert torch.allclose(backend.eps_equivalent_weight(t), torch.tensor([0.5625, 0.0625]))
    torch.manual_seed(3)
    u = torch.rand(5)
    torch.manual_seed(3)
    assert torch.allclose(backend.sample_timesteps(5, "cpu"), u * 1000)  # uniform u, shift 1: t = 1000 u


def test_dpo_timestep_sampling_reaches_the_backend():
    backend = ToyFlowBackend.from_config(OmegaConf.create({"name": "toy_flow"}))
    _module(backend, timestep_sampling="logit_normal", logit_mean=0.5, logit_std=2.0)
    torch.manual_seed(4)
    z = torch.randn(6)
    torch.manual_seed(4)
    assert torch.allclose(backend.sample_timesteps(6, "cpu"), torch.sigmoid(0.5 + 2.0 * z) * 1000, atol=1e-4)


def test_policy_equals_reference_at_step_0_so_the_first_loss_is_log_2(backend):
    batch = {"winner": _pixels(0), "loser": _pixels(1), "caption": PROMPTS}
    torch.manual_seed(0)
    out, used = _module(backend).dpo_step(batch)
    assert torch.equal(used["model_err_w"], used["ref_err_w"]) and torch.equal(used["model_err_l"], used["ref_err_l"])
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert (used["ref_err_w"] > 0).all()
    noisy = backend.add_noise(_pixels(0), _pixels(2), torch.tensor([100.0, 900.0]))
    cond = backend.encode_prompt(PROMPTS)
    with backend.reference() as reference:
        assert torch.equal(backend.predict(noisy, torch.tensor([100.0, 900.0]), cond),
                           reference(noisy, torch.tensor([100.0, 900.0]), cond))


def test_eps_equivalent_beta_scales_the_velocity_errors_by_one_minus_s_squared(backend):
    batch = {"winner": _pixels(0), "loser": _pixels(1), "caption": PROMPTS}
    torch.manual_seed(5)
    _, plain = _module(backend).dpo_step(batch)
    torch.manual_seed(5)
    _, scaled = _module(backend, beta_schedule="eps_equivalent").dpo_step(batch)
    assert torch.equal(plain["t"], scaled["t"])
    weight = (1 - plain["t"] / 1000) ** 2
    assert torch.allclose(scaled["ref_err_w"], plain["ref_err_w"] * weight[:2])
    assert torch.allclose(scaled["ref_err_l"], plain["ref_err_l"] * weight[2:])


def test_one_euler_step_without_guidance_is_noise_minus_the_predicted_velocity(backend):
    video = backend.generate(PROMPTS[:1], num_frames=8, steps=1, guidance=1.0, seed=[7])
    noise = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(7))
    v = backend.predict(noise, torch.tensor([1000.0]), backend.encode_prompt(PROMPTS[:1]))
    expected = ((noise - v).clamp(-1, 1) + 1) / 2  # sigma 1 -> 0 in one step: x0 = x1 - v
    assert torch.allclose(video, expected.permute(0, 2, 1, 3, 4), atol=1e-5)


def test_generate_is_deterministic_per_seed_whatever_the_batch(backend):
    kw = dict(num_frames=8, steps=4, guidance=3.0)
    batched = backend.generate(PROMPTS, seed=[5, 9], **kw)
    alone = backend.generate(PROMPTS[1:], seed=[9], **kw)
    again = backend.generate(PROMPTS, seed=[5, 9], **kw)
    assert batched.shape == (2, 8, 3, 32, 32) and 0 <= batched.min() and batched.max() <= 1
    assert torch.equal(batched, again)
    assert torch.allclose(batched[1], alone[0], atol=1e-4)
    other = backend.generate(PROMPTS[1:], seed=[10], **kw)
    assert not torch.allclose(alone[0], other[0], atol=1e-2)


def test_toy_weights_are_refused_by_the_flow_backend(tmp_path):
    toy = ToyBackend.from_config(OmegaConf.create({"name": "toy"}))
    toy.save_trainable(tmp_path / "w")
    with pytest.raises(UserError, match="model family 'toy', not 'toy_flow'"):
        ToyFlowBackend.from_config(OmegaConf.create({"name": "toy_flow", "trainable_weights": str(tmp_path / "w")}))


def test_a_checkpoint_of_the_other_objective_is_refused_naming_its_scheduler():
    with pytest.raises(UserError, match="its scheduler is DDIMScheduler, but model.name=toy_flow samples with "
                                        "FlowMatchEulerDiscreteScheduler"):
        ToyFlowBackend.from_config(OmegaConf.create({"name": "toy_flow", "pretrained": str(BUILTIN)}))
    with pytest.raises(UserError, match="its scheduler is FlowMatchEulerDiscreteScheduler, but model.name=toy "):
        ToyBackend.from_config(OmegaConf.create({"name": "toy", "pretrained": str(FLOW_BUILTIN)}))


def test_train_base_flow_writes_a_checkpoint_the_backend_loads(tmp_path):
    from videotuna_dpo.toy.train_base import train

    info = train(tmp_path / "ckpt", steps=2, batch_size=2, flow=True, shift=3.0)
    assert info["objective"] == "flow_matching" and info["steps"] == 2
    backend = ToyFlowBackend.from_config(OmegaConf.create({"name": "toy_flow", "pretrained": str(tmp_path / "ckpt")}))
    assert backend.flow_schedule.shift == 3.0  # read from the checkpoint's scheduler config
    torch.manual_seed(1)
    u = torch.rand(3)
    torch.manual_seed(1)
    assert torch.allclose(backend.sample_timesteps(3, "cpu"), 3.0 * u / (1 + 2.0 * u) * 1000)  # e.g. u 0.5 -> s 0.75
