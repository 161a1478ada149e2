"""A contributed scorer without ``score_range`` (hooks/example_scorer) scores alone, and pairs rank by it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from videotuna_dpo.data.video_io import read_video, write_video
from videotuna_dpo.scoring.omniscore import RANGES

LEVELS = {"dim": 0.2, "mid": 0.5, "bright": 0.8}


def _videotuna(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "videotuna_dpo", *map(str, args)], capture_output=True, text=True,
                          env=env)


@pytest.fixture
def lamp_videos(tmp_path):
    """Three uniform 16x16 videos of one prompt, at three brightness levels, with their sidecar prompts."""
    folder = tmp_path / "videos"
    for name, level in LEVELS.items():
        frames = torch.full((4, 3, 16, 16), level)
        frames[1::2] += 0.05  # some change between frames, so temporal flickering is not at its ceiling
        write_video(folder / f"{name}.mp4", frames, lossless=True)
        (folder / f"{name}.mp4.json").write_text(json.dumps({"prompt": "a lamp"}))
    return folder


def _records(path):
    return {os.path.basename(r["path"]): r for r in map(json.loads, path.read_text().splitlines())}


def test_a_scorer_without_score_range_scores_alone_and_the_omniscore_is_left_out_once(
        example_scorer_site, lamp_videos, tmp_path):
    scores = tmp_path / "scores.jsonl"
    proc = _videotuna(example_scorer_site, "score", "--videos", lamp_videos, "--scorers", "example_brightness",
                      "--out", scores, "--batch-size", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("OmniScore left out: none of the scorers example_brightness") == 1
    records = _records(scores)
    assert sorted(records) == ["bright.mp4", "dim.mp4", "mid.mp4"]
    for name, record in records.items():
        expected = read_video(lamp_videos / name).float().div(255).mean().item()
        assert record["status"] == "ok"
        assert record["raw"] == {"example_brightness": pytest.approx(expected, abs=1e-6)}
        assert not {"omniscore", "quality", "semantic", "normalized"} & set(record)

    # pairs by the OmniScore: there is none, and the message names what there is.
    proc = _videotuna(example_scorer_site, "pairs", "--scores", scores, "--out", tmp_path / "ds")
    assert proc.returncode == 2
    assert "has no omniscore score; it records example_brightness: pair by one of them with --by NAME" in proc.stderr

    # pairs --by example_brightness: the brightest against the dimmest, and the manifest says by what.
    proc = _videotuna(example_scorer_site, "pairs", "--scores", scores, "--out", tmp_path / "ds",
                      "--by", "example_brightness", "--alpha", "0")
    assert proc.returncode == 0, proc.stderr
    assert "1 pairs ranked by example_brightness from 1 prompts" in proc.stdout
    manifest = json.loads((tmp_path / "ds" / "pairs" / "manifest.json").read_text())
    assert manifest["ranked_by"] == "example_brightness"
    videos = manifest["videos"]
    (pair,) = manifest["pairs"]
    winner, loser = videos[pair["winner"]], videos[pair["loser"]]
    assert (os.path.basename(winner["path"]), os.path.basename(loser["path"])) == ("bright.mp4", "dim.mp4")
    assert winner["omniscore"] is None
    assert pair["gap"] == pytest.approx(records["bright.mp4"]["raw"]["example_brightness"]
                                        - records["dim.mp4"]["raw"]["example_brightness"])
    assert pair["weight"] == 1.0
    assert (tmp_path / "ds" / "plots" / "example_brightness_hist.png").is_file()


def test_with_a_dimension_beside_it_the_omniscore_is_that_dimension_and_its_raw_score_is_kept(
        example_scorer_site, lamp_videos, tmp_path):
    scores = tmp_path / "scores.jsonl"
    proc = _videotuna(example_scorer_site, "score", "--videos", lamp_videos, "--out", scores, "--no-progress",
                      "--scorers", "example_brightness,temporal_flickering")
    assert proc.returncode == 0, proc.stderr
    assert "OmniScore left out" not in proc.stderr
    for record in _records(scores).values():
        assert set(record["raw"]) == {"example_brightness", "temporal_flickering"}
        low, high = RANGES["temporal_flickering"]
        expected = (record["raw"]["temporal_flickering"] - low) / (high - low)
        assert record["dimensions_used"] == ["temporal_flickering"]
        assert record["omniscore"] == pytest.approx(expected)


def test_the_eval_callback_logs_the_raw_score_of_a_scorer_that_is_no_dimension(example_scorer_site, monkeypatch,
                                                                              capsys):
    from videotuna_dpo.eval_callback import EvalCallback
    from videotuna_dpo.registry import Registry

    monkeypatch.syspath_prepend(str(example_scorer_site))

    class Constant:
        def generate(self, prompts, seed, **kwargs):
            return torch.stack([torch.full((2, 3, 8, 8), 0.1 * (s + 1)) for s in seed])  # [B, F, C, H, W]

    callback = EvalCallback(1, ["a lamp"], seeds=[0, 2], scorers=["example_brightness"], registry=Registry.load())
    # 8x8 frames: the motion measures (optical flow) cannot score them and are left out, said once.
    assert callback.measure(Constant(), "cpu") == {"raw/example_brightness": pytest.approx((0.1 + 0.3) / 2)}
    assert callback.measure(Constant(), "cpu") == {"raw/example_brightness": pytest.approx((0.1 + 0.3) / 2)}
    assert capsys.readouterr().out.splitlines() == [
        f"eval callback: {name} left out: needs frames of at least 16 px a side, got 8x8 (OpenCV's DIS optical flow)"
        for name in ("dynamic_degree", "motion_magnitude")]
