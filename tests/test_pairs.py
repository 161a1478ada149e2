import json

import numpy as np
import pytest

from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.pairs import bin_probabilities, pair_weights, select_pairs

ALL = [0.101, 0.105, 0.152, 0.158, 0.159, 0.30, 0.305, 0.309, 0.5, 0.9]
W = [0.9, 0.309, 0.5]
L = [0.101, 0.152, 0.158]


def test_bin_probabilities_are_histogram_frequencies():
    # bins of width 0.01: 10 -> 2 videos, 15 -> 3, 30 -> 3 (0.30 must not fall into bin 29), 50 -> 1, 90 -> 1
    assert bin_probabilities([0.101, 0.159, 0.30, 0.5], ALL).tolist() == pytest.approx([0.2, 0.3, 0.3, 0.1])


@pytest.mark.parametrize(
    "mode, alpha, expected",
    [
        ("sqrt", 0.0, [1.0, 1.0, 1.0]),
        ("product", 0.0, [1.0, 1.0, 1.0]),
        # p = sqrt(0.1*0.2), sqrt(0.3*0.3), sqrt(0.1*0.3)
        ("sqrt", 1.0, [0.72 / 0.02 ** 0.5, 0.72 / 0.3, 0.72 / 0.03 ** 0.5]),
        ("sqrt", 0.5, [(0.72 / 0.02 ** 0.5) ** 0.5, (0.72 / 0.3) ** 0.5, (0.72 / 0.03 ** 0.5) ** 0.5]),
        # p = 0.1*0.2, 0.3*0.3, 0.1*0.3
        ("product", 1.0, [36.0, 8.0, 24.0]),
        ("product", 0.5, [6.0, 8.0 ** 0.5, 24.0 ** 0.5]),
    ],
)
def test_pair_weights_match_hand_computed_values(mode, alpha, expected):
    assert pair_weights(W, L, ALL, alpha, mode=mode).tolist() == pytest.approx(expected, rel=1e-9)


def test_rarer_pairs_weigh_more():
    w = pair_weights(W, L, ALL, 1.0)
    assert w[0] > w[2] > w[1]  # the pair of the two rarest bins first


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of sqrt, product"):
        pair_weights(W, L, ALL, 1.0, mode="mean")


def _records(scores_by_prompt):
    return [{"path": f"/v/{p}_{i}.mp4", "prompt": p, "omniscore": s}
            for p, scores in scores_by_prompt.items() for i, s in enumerate(scores)]


def test_best_vs_worst_per_prompt_and_ties_never_pair():
    records = _records({"a": [0.5, 0.7, 0.6, 0.4], "b": [0.3, 0.3, 0.3, 0.3], "c": [0.8]})
    pairs, stats = select_pairs(records)
    assert [(p.prompt, p.winner["path"], p.loser["path"]) for p in pairs] == [("a", "/v/a_1.mp4", "/v/a_3.mp4")]
    assert pairs[0].gap == pytest.approx(0.3)
    assert stats == {"prompts": 3, "prompts_without_pair": 2}


def test_all_pairs_above_a_gap_and_the_min_gap_filter():
    records = _records({"a": [0.5, 0.7, 0.6, 0.6]})
    pairs, _ = select_pairs(records, "all-gap", min_gap=0.05)
    got = sorted((p.winner["omniscore"], p.loser["omniscore"]) for p in pairs)
    # 0.6 vs 0.6 is a tie; every other ordered pair differs by >= 0.1
    assert got == [(0.6, 0.5), (0.6, 0.5), (0.7, 0.5), (0.7, 0.6), (0.7, 0.6)]
    assert select_pairs(records, "best-worst", min_gap=0.25)[0] == []
    with pytest.raises(UserError, match="--strategy must be one of"):
        select_pairs(records, "random")
