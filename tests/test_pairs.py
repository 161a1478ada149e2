import json
import os
import re
import stat

import pytest

from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.pairs import bin_probabilities, build_pairs_dataset, pair_weights, select_pairs

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


# ---------------------------------------------------------------- the dataset is written whole or not at all


def _scored(path, omniscores, raw_nan_line=None):
    """scores.jsonl of two prompts' videos under ``path.parent / "samples"``; one line's raw flicker NaN on request."""
    lines = []
    for n, (prompt, omni) in enumerate(omniscores, 1):
        raw = {"temporal_flickering": float("nan") if n == raw_nan_line else 0.9}
        lines.append(json.dumps({"path": str(path.parent / "samples" / f"{prompt}_{n}.mp4"), "status": "ok",
                                 "prompt": prompt, "omniscore": omni, "raw": raw,
                                 "normalized": {"temporal_flickering": omni}, "quality": omni, "semantic": omni,
                                 "meta": {"seed": n}, "frames": 8}))
    path.write_text("\n".join(lines) + "\n")
    return path


SCORES = [("a", 0.5), ("a", 0.7), ("b", 0.3), ("b", 0.6)]


def _snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def old_dataset(tmp_path):
    out = tmp_path / "ds"
    build_pairs_dataset(_scored(tmp_path / "old.jsonl", SCORES), out, plots=False)
    return out, _snapshot(out)


def test_a_rerun_failing_after_metadata_is_written_leaves_the_old_dataset_byte_identical(old_dataset, tmp_path,
                                                                                        monkeypatch):
    out, before = old_dataset
    written = []

    def failing_plots(directory, *args):
        written.append(sorted(p.name for p in (directory.parent / "pairs").iterdir()))
        raise RuntimeError("disk full")

    monkeypatch.setattr("videotuna_dpo.pipeline.plots.pair_plots", failing_plots)
    with pytest.raises(RuntimeError, match="disk full"):
        build_pairs_dataset(_scored(tmp_path / "new.jsonl", SCORES[:2] + [("c", 0.1), ("c", 0.9)]), out, alpha=2.0)
    assert written == [["manifest.json", "metadata.json", "pair.json"]]  # the new files existed when it failed
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "new.jsonl", "old.jsonl"]  # no staging dir left


def test_a_nan_raw_dimension_is_refused_naming_line_and_dimension_and_nothing_is_written(old_dataset, tmp_path):
    out, before = old_dataset
    scores = _scored(tmp_path / "new.jsonl", SCORES, raw_nan_line=3)
    with pytest.raises(UserError, match=r"new\.jsonl:3: raw dimension 'temporal_flickering' of .*b_3\.mp4 is nan"):
        build_pairs_dataset(scores, out)
    assert _snapshot(out) == before
    with pytest.raises(UserError, match="new.jsonl:3: raw dimension"):
        build_pairs_dataset(scores, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("setting, message", [
    ({"beta": -1.0}, "--beta must be a finite number > 0, got -1.0"),
    ({"alpha": float("nan")}, "--alpha must be a finite number >= 0 (0 = plain DPO), got nan"),
    ({"alpha": -0.5}, "--alpha must be a finite number >= 0"),
    ({"bin_width": 0.0}, "--bin-width must be a finite number > 0, got 0.0"),
    ({"min_gap": float("inf")}, "--min-gap must be a finite number >= 0, got inf"),
])
def test_bad_settings_are_refused_before_anything_is_written(old_dataset, tmp_path, setting, message):
    out, before = old_dataset
    with pytest.raises(UserError, match=re.escape(message)):
        build_pairs_dataset(tmp_path / "old.jsonl", out, **setting)
    assert _snapshot(out) == before


def test_clip_paths_are_relative_to_the_final_dataset_dir_which_gets_mkdirs_permissions(tmp_path, umask_022):
    out = tmp_path / "data" / "ds"
    summary = build_pairs_dataset(_scored(tmp_path / "s.jsonl", SCORES), out, plots=False)
    metadata = json.loads((out / "pairs" / "metadata.json").read_text())
    assert metadata[0]["basic"]["clip_path"] == "../../../samples/a_2.mp4"
    assert {os.path.normpath(out / "pairs" / m["basic"]["clip_path"]) for m in metadata} == {
        str(tmp_path / "samples" / f"{name}.mp4") for name in ("a_2", "a_1", "b_4", "b_3")}
    assert summary["train_data"] == str(out / "train_data.yaml")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "pairs").stat().st_mode) == 0o755


def test_a_dataset_dir_holding_other_files_is_refused_not_replaced(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out .*ds holds notes\.txt, which is not part of a pairs dataset"):
        build_pairs_dataset(_scored(tmp_path / "s.jsonl", SCORES), out, plots=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]



def test_cli_refuses_a_negative_beta_with_the_message_and_exit_code_2(old_dataset, tmp_path, capsys):
    from videotuna_dpo.cli import main

    out, before = old_dataset
    assert main(["pairs", "--scores", str(tmp_path / "old.jsonl"), "--out", str(out), "--beta", "-1"]) == 2
    assert "videotuna: error: --beta must be a finite number > 0, got -1.0" in capsys.readouterr().err
    assert _snapshot(out) == before
