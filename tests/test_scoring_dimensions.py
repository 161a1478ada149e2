"""The no-weights VBench dimensions: exact formulas, the dynamic-degree rule, smoothness ordering."""

from pathlib import Path

import numpy as np
import pytest
import torch

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import Scorer
from videotuna_dpo.scoring.flickering import TemporalFlickering
from videotuna_dpo.scoring.imaging import ImagingQuality, niqe_to_quality
from videotuna_dpo.scoring.motion import (
    DynamicDegree,
    MotionSmoothness,
    dynamic_threshold,
    is_dynamic,
    required_pairs,
    top_magnitude,
)


def disk_video(positions, size=96, radius=14, seed=0) -> torch.Tensor:
    """A textured disk at x = positions[f] on a smooth background -> float [F, 3, size, size] in [0, 1]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = 0.35 + 0.15 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    frames = []
    for cx in positions:
        img = background.copy()
        inside = (xx - cx) ** 2 + (yy - size / 2) ** 2 < radius**2
        img[inside] = 0.85 - 0.4 * ((xx[inside] - cx + radius) / (2 * radius)) + 0.05 * np.sin(yy[inside])
        frames.append(np.stack([img, img * 0.9, 1.0 - img]))
    return torch.from_numpy(np.stack(frames)).clamp(0, 1)


def test_temporal_flickering_matches_vbench_formula_exactly():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, size=(2, 6, 3, 20, 24), dtype=np.uint8)
    frames[1] = frames[1] // 4 + 100  # a calmer second video
    expected = []
    for video in frames.astype(np.float64):
        maes = [np.mean(np.abs(video[i] - video[i + 1])) for i in range(len(video) - 1)]
        expected.append((255.0 - np.mean(maes)) / 255.0)
    got = TemporalFlickering(device="cpu")(torch.from_numpy(frames).float() / 255.0, ["a", "b"])
    assert got.dtype == torch.float64
    assert np.allclose(got.numpy(), expected, atol=1e-6, rtol=0)
    assert expected[1] > expected[0]


def test_dynamic_threshold_rule_at_its_boundary():
    # 256 px short side: threshold 6 px; 16 frames need round(4 * 16 / 16) = 4 pairs.
    assert dynamic_threshold(256, 320) == pytest.approx(6.0)
    assert dynamic_threshold(512, 512) == pytest.approx(12.0)
    assert required_pairs(16) == 4 and required_pairs(8) == 2 and required_pairs(6) == 2
    assert required_pairs(2) == 0  # VBench's count: a 2-frame clip needs no pair above the threshold
    three_above = [6.01, 6.01, 6.01] + [0.0] * 12
    assert not is_dynamic(three_above, 256, 256, 16)
    assert is_dynamic(three_above + [6.01], 256, 256, 16)
    # Exactly at the threshold does not count: VBench uses a strict ">".
    assert not is_dynamic([6.0] * 15, 256, 256, 16)
    assert is_dynamic([6.0001] * 4 + [0.0] * 11, 256, 256, 16)


def test_top_magnitude_is_mean_of_largest_five_percent():
    flow = np.zeros((1, 10, 10, 2), dtype=np.float32)
    flow[0, 0, :5, 0] = 3.0  # 5 of 100 pixels move (3, 4) -> magnitude 5
    flow[0, 0, :5, 1] = 4.0
    assert top_magnitude(flow)[0] == pytest.approx(5.0)
    flow[0, 0, 0] = (0.0, 10.0)
    assert top_magnitude(flow)[0] == pytest.approx((10.0 + 4 * 5.0) / 5)


def test_dynamic_degree_separates_static_from_moving():
    static = disk_video([40] * 16)
    moving = disk_video([10 + 5 * f for f in range(16)], radius=30)  # fills > 5% of the frame
    scorer = DynamicDegree(device="cpu")
    scores = scorer(torch.stack([static, moving]), ["a", "b"])
    assert scores.tolist() == [0.0, 1.0]
    # The moving clip's pair magnitudes sit near the true 5 px/frame, above the 96 px threshold 2.25.
    mags, (h, w), n = scorer.pair_magnitudes(moving)
    assert (h, w, n) == (96, 96, 16)
    assert np.median(mags) == pytest.approx(5.0, abs=1.0)
    assert dynamic_threshold(h, w) == pytest.approx(2.25)


def test_motion_smoothness_prefers_linear_motion_to_jitter():
    rng = np.random.default_rng(0)
    linear = [20 + 3 * f for f in range(16)]
    jitter = [x + int(rng.integers(-6, 7)) for x in linear]
    scorer = MotionSmoothness(device="cpu")
    smooth, jerky, still = scorer(torch.stack([disk_video(linear), disk_video(jitter), disk_video([40] * 16)]), ["a"] * 3)
    assert still == pytest.approx(1.0)
    assert smooth > jerky
    # The interpolation error of the jittering clip is several times that of the linear one.
    assert smooth > 0.99 and (1 - jerky) > 3 * (1 - smooth)


def test_motion_smoothness_refuses_unknown_interpolator_and_flow():
    with pytest.raises(UserError, match="unknown interpolator 'rife'; choose one of flow, amt, auto"):
        MotionSmoothness(device="cpu", interpolator="rife")
    with pytest.raises(UserError, match="unknown flow method 'pwc'"):
        DynamicDegree(device="cpu", flow="pwc")


def test_scorers_check_the_input_contract():
    scorer = MotionSmoothness(device="cpu")
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        scorer(torch.zeros(4, 3, 8, 8), ["a"] * 4)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        scorer(torch.zeros(2, 4, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="at least 3 frames"):
        scorer(torch.zeros(1, 2, 3, 8, 8), ["a"])


def test_builtin_and_example_scorers_satisfy_the_protocol():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hooks" / "example_scorer"))
    try:
        from videotuna_example_scorer import MeanBrightnessScorer
    finally:
        sys.path.pop(0)
    for scorer in (MeanBrightnessScorer(), TemporalFlickering(device="cpu"), ImagingQuality(device="cpu", backend="niqe")):
        assert isinstance(scorer, Scorer)
        assert scorer.kind in ("quality", "semantic")
    out = MeanBrightnessScorer()(torch.full((2, 3, 3, 4, 4), 0.5), ["a", "b"])
    assert out.tolist() == [0.5, 0.5]


def test_imaging_quality_proxy_prefers_sharp_photo_to_blurred_and_noisy():
    import cv2
    from PIL import Image

    cbook = pytest.importorskip("matplotlib.cbook")  # ships a real photograph as sample data
    photo = np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")), dtype=np.float32) / 255.0
    base = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)
    blurred = cv2.GaussianBlur(base, (0, 0), 2.0)
    noisy = np.clip(base + np.random.default_rng(0).normal(0, 0.08, base.shape).astype(np.float32), 0, 1)
    videos = torch.from_numpy(np.stack([base, blurred, noisy])).permute(0, 3, 1, 2)[:, None].expand(3, 2, 3, 256, 256)
    scorer = ImagingQuality(device="cpu", backend="auto")
    assert scorer.backend == "niqe" and scorer.needs_weights is False
    sharp, soft, grainy = scorer(videos.contiguous(), ["a"] * 3).tolist()
    assert 0 < soft < sharp <= 1 and 0 < grainy < sharp
    assert sharp - soft > 0.05 and sharp - grainy > 0.05
    assert niqe_to_quality(torch.tensor([0.0, 10.0])).tolist() == [1.0, 0.5]


def test_imaging_quality_small_frames_are_upscaled_not_refused():
    video = disk_video([30, 32, 34], size=64)[None]
    score = ImagingQuality(device="cpu", backend="niqe")(video, ["a"])
    assert 0 < score.item() <= 1


def test_dynamic_degree_samples_by_the_files_frame_rate_unless_the_fps_option_is_set(tmp_path):
    """VBench keeps every round(fps / 8)-th frame: the same frames move twice as far per pair at 16 fps."""
    import json

    from videotuna_dpo.data.scores import read_scores
    from videotuna_dpo.data.video_io import write_video
    from videotuna_dpo.pipeline.score import score_videos

    g = torch.Generator().manual_seed(0)
    texture = torch.rand(3, 24, 24, generator=g)
    frames = torch.full((17, 3, 64, 64), 0.5)
    for t in range(17):  # 1 px per frame: under the 1.5 px threshold of a 64 px clip; 2 px per kept pair over it
        frames[t, :, 20:44, 8 + t : 32 + t] = texture
    (tmp_path / "v").mkdir()
    write_video(tmp_path / "v" / "at8.mp4", frames, fps=8, lossless=True)
    write_video(tmp_path / "v" / "at16.mp4", frames, fps=16, lossless=True)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"at8.mp4": "x", "at16.mp4": "x"}))

    def run(out, **options):
        score_videos(videos=str(tmp_path / "v"), out=str(tmp_path / out), prompts=str(prompts),
                     scorers=["dynamic_degree"], device="cpu", progress=False, options={"dynamic_degree": options})
        return {Path(p).name: r for p, r in read_scores(tmp_path / out).items()}

    by_file = run("a.jsonl")
    assert by_file["at8.mp4"]["fps"] == 8.0 and by_file["at16.mp4"]["fps"] == 16.0
    assert by_file["at8.mp4"]["raw"]["dynamic_degree"] == 0.0
    assert by_file["at16.mp4"]["raw"]["dynamic_degree"] == 1.0
    forced = run("b.jsonl", fps=8)  # the option wins over the file
    assert forced["at16.mp4"]["raw"]["dynamic_degree"] == 0.0


@pytest.mark.parametrize("name", ["dynamic_degree", "motion_smoothness", "motion_magnitude"])
def test_dis_flow_scorers_refuse_frames_under_16_px_a_side_instead_of_crashing(name):
    """OpenCV's DIS raises on 8x8 frames and kills the process (SIGSEGV) on 15x64 ones: such videos are unscorable
    (``videotuna score`` records them as failed with this reason) and never reach it."""
    from videotuna_dpo.scoring.build import build_scorers

    options = {"motion_smoothness": {"interpolator": "flow"}} if name == "motion_smoothness" else {}
    scorer = build_scorers([name], "cpu", options)[name]
    assert scorer.unscorable(16, 15, 64) == ("needs frames of at least 16 px a side, got 15x64 (OpenCV's DIS "
                                             "optical flow)")
    assert scorer.unscorable(16, 16, 64) is None
    with pytest.raises(ValueError, match=f"{name}: needs frames of at least 16 px a side, got 8x8"):
        scorer(torch.rand(1, 16, 3, 8, 8), ["p"])
    assert scorer(torch.rand(1, 4, 3, 16, 64), ["p"]).shape == (1,)
