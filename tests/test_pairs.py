import json
import os
import re
import stat

import pytest
import yaml

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


def _scored(path, omniscores, raw_nan_line=None, frames=None, files=False):
    """scores.jsonl of two prompts' videos under ``path.parent / "samples"``; one line's raw flicker NaN on request.

    ``frames``: each video's frame count (default 8, 1 s at the default 8 fps); ``files``: write each video's file.
    """
    lines = []
    for n, (prompt, omni) in enumerate(omniscores, 1):
        raw = {"temporal_flickering": float("nan") if n == raw_nan_line else 0.9}
        video = path.parent / "samples" / f"{prompt}_{n}.mp4"
        if files:
            video.parent.mkdir(parents=True, exist_ok=True)
            video.write_text(video.name)
        lines.append(json.dumps({"path": str(video), "status": "ok",
                                 "prompt": prompt, "omniscore": omni, "raw": raw,
                                 "normalized": {"temporal_flickering": omni}, "quality": omni, "semantic": omni,
                                 "meta": {"seed": n}, "frames": frames[n - 1] if frames else 8}))
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


# ---------------------------------------------------------------- the official VideoDPO loader reads what pairs writes


def _same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


@pytest.mark.parametrize("mode, alpha", [("sqrt", 1.0), ("product", 0.5), ("product", 0.0)])
def test_the_official_loader_reads_what_pairs_writes_from_any_working_directory(tmp_path, monkeypatch, mode, alpha):
    from tests.official_loader import official_pairs
    from videotuna_dpo.data.preference import load_pairs

    scores = [("a", 0.5), ("a", 0.71), ("a", 0.62), ("b", 0.3), ("b", 0.61), ("c", 0.2), ("c", 0.9), ("c", 0.52)]
    out = tmp_path / "data" / "ds"
    build_pairs_dataset(_scored(tmp_path / "s.jsonl", scores, frames=[16] * 8, files=True), out, strategy="all-gap",
                        alpha=alpha, mode=mode, plots=False)
    manifest = json.loads((out / "pairs" / "manifest.json").read_text())
    videos = manifest["videos"]
    expected = [(videos[m["winner"]]["path"], videos[m["loser"]]["path"], m["prompt"], m["weight"])
                for m in manifest["pairs"]]
    assert len(expected) == 7 and len(videos) == 8  # all-gap: 3 + 1 + 3 pairs over 8 videos, some in several pairs
    official_yaml = out / "train_data_official.yaml"
    assert yaml.safe_load(official_yaml.read_text()) == {"META": [str(out / "pairs")]}  # absolute
    assert yaml.safe_load((out / "train_data.yaml").read_text()) == {"META": ["pairs"]}  # portable

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    official = official_pairs(str(official_yaml), dupbeta=alpha)
    assert len(official) == len(expected)
    for got, (winner, loser, prompt, weight) in zip(official, expected):
        assert _same_file(got.winner, winner) and _same_file(got.loser, loser)
        assert got.caption == prompt and got.dupfactor == pytest.approx(weight, rel=1e-12)
    # Our reader takes either yaml and gives the same pairs; its pair_score weights are the official dupfactor.
    for train_data in (out / "train_data.yaml", official_yaml):
        ours = load_pairs(train_data)
        assert [(os.path.realpath(p.winner), os.path.realpath(p.loser), p.caption) for p in ours] == [
            (os.path.realpath(o.winner), os.path.realpath(o.loser), o.caption) for o in official]
        assert [p.weight for p in ours] == pytest.approx([o.dupfactor for o in official], rel=1e-12)
        scored = load_pairs(train_data, weights="pair_score", alpha=alpha)
        assert [p.weight for p in scored] == pytest.approx([o.dupfactor for o in official], rel=1e-12)
    # The portable yaml is not for the official loader: its relative META dir and clip paths do not survive
    # the working directory nor the join with the yaml's own path.
    with pytest.raises(FileNotFoundError):
        official_pairs(str(out / "train_data.yaml"))
    monkeypatch.chdir(out)
    with pytest.raises(FileNotFoundError, match="train_data.yaml/pairs/"):
        official_pairs(str(out / "train_data.yaml"))


def test_the_official_yaml_names_the_real_dataset_dir_when_out_is_reached_through_a_symlink(tmp_path, monkeypatch):
    from tests.official_loader import official_pairs

    (tmp_path / "disk" / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "data")
    scores = _scored(tmp_path / "s.jsonl", SCORES, frames=[16] * 4, files=True)
    summary = build_pairs_dataset(scores, tmp_path / "link" / "ds", plots=False)
    assert summary["official_train_data"] == str(tmp_path / "disk" / "data" / "ds" / "train_data_official.yaml")
    monkeypatch.chdir(tmp_path / "disk")
    # `..` from the real pairs dir leads back to the samples, whichever path names the dataset.
    got = official_pairs(str(tmp_path / "link" / "ds" / "train_data_official.yaml"))
    assert [(os.path.basename(p.winner), os.path.basename(p.loser)) for p in got] == [
        ("a_2.mp4", "a_1.mp4"), ("b_4.mp4", "b_3.mp4")]
    assert all(os.path.isfile(p.winner) and os.path.isfile(p.loser) for p in got)


def test_pairs_warns_once_about_clips_the_official_loader_would_drop_and_names_the_fix(tmp_path, monkeypatch, capsys):
    from tests.official_loader import official_pairs, official_videos
    from videotuna_dpo.cli import main

    # a_1 and b_4 are 4 frames at 8 fps: 0.5 s, under the official clip_length of 1.0 s.
    scores = _scored(tmp_path / "s.jsonl", SCORES, frames=[4, 16, 16, 4], files=True)
    out = tmp_path / "ds"
    assert main(["pairs", "--scores", str(scores), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning:") == 1
    assert "warning: 2 of 4 videos are shorter than 1 s" in captured.err
    assert "give it clip_length: 0 (data.params.train.params in its config)" in captured.err
    assert f"official VideoDPO code: data_root: {out / 'train_data_official.yaml'}" in captured.out
    durations = [m["basic"]["clip_duration"] for m in json.loads((out / "pairs" / "metadata.json").read_text())]
    assert durations == [2.0, 0.5, 0.5, 2.0]  # a_2, a_1 (pair 0), b_4, b_3 (pair 1)
    # The trap: with its default clip_length the official loader indexes a shorter list, so pair 0's loser
    # (index 1, a_1) becomes b_3, a video of another prompt, and pair 1 is out of range; with clip_length 0
    # it reads every pair as written.
    monkeypatch.chdir(tmp_path)
    short = official_videos(str(out / "train_data_official.yaml"))
    assert [os.path.basename(v) for v in short] == ["a_2.mp4", "b_3.mp4"]
    with pytest.raises(IndexError):
        official_pairs(str(out / "train_data_official.yaml"))
    fixed = official_pairs(str(out / "train_data_official.yaml"), clip_length=0)
    assert [(os.path.basename(p.winner), os.path.basename(p.loser)) for p in fixed] == [
        ("a_2.mp4", "a_1.mp4"), ("b_4.mp4", "b_3.mp4")]


def test_pairs_says_nothing_about_clip_length_when_every_clip_is_long_enough(tmp_path, capsys):
    from videotuna_dpo.cli import main

    scores = _scored(tmp_path / "s.jsonl", SCORES, frames=[8, 16, 16, 8], files=True)  # 8 frames at 8 fps: 1.0 s
    assert main(["pairs", "--scores", str(scores), "--out", str(tmp_path / "ds")]) == 0
    assert "clip_length" not in capsys.readouterr().err
