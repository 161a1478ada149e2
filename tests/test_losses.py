import math

import pytest
import torch

from videotuna_dpo.losses import per_sample_mse, preference_loss

MW = torch.tensor([0.30, 0.50, 0.20])
ML = torch.tensor([0.40, 0.45, 0.20])
RW = torch.tensor([0.35, 0.50, 0.25])
RL = torch.tensor([0.35, 0.40, 0.10])
BETA = 10.0


def hand_inside():
    # inside_i = -0.5 * beta * ((mw - ml) - (rw - rl)), by hand:
    # pair 0: (0.30-0.40) - (0.35-0.35) = -0.10 -> +0.5
    # pair 1: (0.50-0.45) - (0.50-0.40) = -0.05 -> +0.25
    # pair 2: (0.20-0.20) - (0.25-0.10) = -0.15 -> +0.75
    return [0.5, 0.25, 0.75]


def logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
@pytest.mark.parametrize("sft", [0.0, 0.3])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_matches_closed_form(loss_type, weights, sft):
    inside = hand_inside()
    w = weights or [1.0, 1.0, 1.0]
    if loss_type == "sigmoid":
        terms = [-logsig(x) for x in inside]
    elif loss_type == "hinge":
        terms = [max(0.0, 1 - x) for x in inside]
    else:
        terms = [(x / BETA - 1 / (2 * BETA)) ** 2 for x in inside]
    expected = sum(wi * t for wi, t in zip(w, terms)) / 3 + sft * (0.30 + 0.50 + 0.20) / 3
    out = preference_loss(
        MW, ML, RW, RL, BETA, loss_type=loss_type,
        weights=None if weights is None else torch.tensor(weights), sft_weight=sft,
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.inside.tolist() == pytest.approx(inside, rel=1e-5)
    assert out.reward_margin.item() == pytest.approx(0.5, rel=1e-5)
    assert out.implicit_acc.item() == pytest.approx(1.0)
    # reward_w = mean(-0.5 beta (mw - rw)) = -5 * mean([-0.05, 0, -0.05]) = 1/6
    assert out.reward_w.item() == pytest.approx(5 * 0.10 / 3, rel=1e-5)
    # reward_l = -5 * mean([0.05, 0.05, 0.10]) = -1/3
    assert out.reward_l.item() == pytest.approx(-5 * 0.20 / 3, rel=1e-5)


def test_implicit_acc_counts_only_strictly_positive_margins():
    out = preference_loss(
        torch.tensor([0.1, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.2]),
        torch.zeros(3), torch.zeros(3), beta=1.0,
    )
    assert out.implicit_acc.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_gradient_pushes_winner_error_down_relative_to_loser(loss_type):
    mw = MW.clone().requires_grad_(True)
    ml = ML.clone().requires_grad_(True)
    # Small beta keeps hinge inside its active region (inside < 1) and ipo below its target margin.
    out = preference_loss(mw, ml, RW, RL, beta=0.5, loss_type=loss_type)
    out.loss.backward()
    assert (mw.grad > 0).all(), "descending the loss must lower the winner's error"
    assert (ml.grad < 0).all(), "descending the loss must raise the loser's error"


def test_reference_errors_get_no_gradient():
    rw = RW.clone().requires_grad_(True)
    out = preference_loss(MW.clone().requires_grad_(True), ML, rw, RL, BETA)
    out.loss.backward()
    assert rw.grad is None


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(MW, ML, RW, RL, BETA, loss_type="kto")
    with pytest.raises(ValueError, match=r"weights must be \[B\]"):
        preference_loss(MW, ML, RW, RL, BETA, weights=torch.ones(2))
    with pytest.raises(ValueError, match=r"must all be \[B\]"):
        preference_loss(MW, ML[:2], RW, RL, BETA)


def test_per_sample_mse_means_over_all_but_batch():
    pred = torch.zeros(2, 3, 4)
    target = torch.ones(2, 3, 4)
    target[1] = 2.0
    assert per_sample_mse(pred, target).tolist() == [1.0, 4.0]
