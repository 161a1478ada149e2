"""The OmniScore aggregate against hand-computed values, full and reduced dimension sets."""

import math

import pytest

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.omniscore import DIMENSIONS, OmniScoreConfig, normalize, omniscore

FULL = {
    "subject_consistency": 0.95,
    "temporal_flickering": 0.97,
    "motion_smoothness": 0.98,
    "dynamic_degree": 1.0,
    "aesthetic_quality": 0.6,
    "imaging_quality": 0.65,
    "overall_consistency": 0.25,
}


def test_full_set_matches_the_paper_formula():
    quality = (
        (0.95 - 0.1462) / (1 - 0.1462)
        + (0.97 - 0.6293) / (1 - 0.6293)
        + (0.98 - 0.706) / (0.9975 - 0.706)
        + 0.5 * 1.0
        + 0.6
        + 0.65
    ) / 5.5
    semantic = 0.25 / 0.364
    out = omniscore(FULL)
    assert out["quality"] == pytest.approx(quality, abs=1e-12)
    assert out["semantic"] == pytest.approx(semantic, abs=1e-12)
    assert out["omniscore"] == pytest.approx((4 * quality + semantic) / 5, abs=1e-12)
    assert out["omniscore"] == pytest.approx(0.79925005503863, abs=1e-12)
    assert sorted(out["dimensions_used"]) == sorted(DIMENSIONS)
    assert sum(w for n, w in out["weights"].items() if n != "overall_consistency") == 5.5
    assert out["normalized"]["motion_smoothness"] == pytest.approx((0.98 - 0.706) / 0.2915)
    assert out["ignored"] == []


def test_reduced_quality_set_renormalises_by_the_weights_used():
    raw = {"temporal_flickering": 0.97, "dynamic_degree": 0.0, "imaging_quality": 0.5}
    out = omniscore(raw)
    quality = ((0.97 - 0.6293) / (1 - 0.6293) + 0.5 * 0.0 + 0.5) / 2.5
    assert out["quality"] == pytest.approx(quality, abs=1e-12)
    assert out["quality"] == pytest.approx(0.5676288103587807, abs=1e-12)
    # No semantic dimension: Semantic is None and OmniScore is Quality.
    assert out["semantic"] is None
    assert out["omniscore"] == pytest.approx(quality, abs=1e-12)
    assert sorted(out["dimensions_used"]) == ["dynamic_degree", "imaging_quality", "temporal_flickering"]
    assert out["weights"] == {"temporal_flickering": 1.0, "dynamic_degree": 0.5, "imaging_quality": 1.0}


def test_reduced_set_with_semantic_keeps_four_to_one():
    out = omniscore({"aesthetic_quality": 0.4, "overall_consistency": 0.273})
    assert out["quality"] == pytest.approx(0.4)
    assert out["semantic"] == pytest.approx(0.75)
    assert out["omniscore"] == pytest.approx((4 * 0.4 + 0.75) / 5)
    only_semantic = omniscore({"overall_consistency": 0.091})
    assert only_semantic["quality"] is None and only_semantic["omniscore"] == pytest.approx(0.25)


def test_configured_weights_change_and_drop_dimensions():
    config = OmniScoreConfig().with_weights({"dynamic_degree": 0.0, "imaging_quality": 2.0})
    raw = {"temporal_flickering": 1.0, "dynamic_degree": 1.0, "imaging_quality": 0.25}
    out = omniscore(raw, config)
    assert "dynamic_degree" not in out["dimensions_used"] and "dynamic_degree" in out["ignored"]
    assert out["quality"] == pytest.approx((1.0 + 2 * 0.25) / 3)
    with pytest.raises(UserError, match="unknown dimension.*dynamic_degre\\b"):
        OmniScoreConfig().with_weights({"dynamic_degre": 1.0})


def test_unknown_dimensions_are_recorded_as_ignored_and_values_are_not_clipped():
    out = omniscore({"motion_smoothness": 0.999, "example_brightness": 0.3})
    assert out["ignored"] == ["example_brightness"]
    assert out["normalized"]["motion_smoothness"] > 1.0  # VBench does not clip either
    assert normalize("overall_consistency", 0.364) == pytest.approx(1.0)


def test_no_usable_dimension_or_non_finite_value_is_an_error():
    with pytest.raises(UserError, match="needs at least one of the dimensions"):
        omniscore({"example_brightness": 0.3})
    with pytest.raises(ValueError, match="imaging_quality is nan"):
        omniscore({"imaging_quality": math.nan})
