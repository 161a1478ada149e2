"""Our AMT-S (scoring/amt.py) against VBench's: checkpoint layout, outputs, the motion_smoothness score.

The reference outputs in ``fixtures/amt_reference.npz`` come from VBench's own AMT-S network and
its ``MotionSmoothness.motion_score``, run by ``fixtures/make_amt_reference.py`` with the weights
of :func:`golden_weights` on the inputs made here. VBench is not needed to run these tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest
import torch

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.amt import (
    AMT_FILE,
    AMTS,
    amt_shape_manifest,
    interpolate_midframes,
    load_amt,
    pad_amounts,
    to_uint8_truncated,
)
from videotuna_dpo.scoring.base import WEIGHTS_ENV, MissingWeightsError
from videotuna_dpo.scoring.motion import MotionSmoothness, to_frames_uint8

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE = FIXTURES / "amt_reference.npz"
MANIFEST = FIXTURES / "amt_s_state_dict_shapes.json"

PAIR_SIZE = (128, 128)  # multiples of 16, the smallest sides AMT-S handles (see amt.MIN_PADDED_SIDE)
VIDEO_SIZE = (117, 131)  # not square, padded to 128 x 144 with uneven splits: rows 5 + 6, columns 6 + 7
VIDEO_POSITIONS = (30, 38, 43, 53, 58)  # 5 frames, uneven steps: the midframes cannot be exact


def golden_weights(shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic stand-in weights for every entry of an AMT-S state dict.

    All tensors come from one ``torch.Generator(seed)`` in sorted key order: biases N(0, 0.02^2),
    other 1-D entries (the PReLU slopes) U(0.05, 0.35), everything else N(0, 0.5^2 / fan_in) with
    fan_in the product of the trailing dimensions. The gain 0.5 keeps the predicted frames mostly
    inside (0, 1), so the final clamp hides little.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith("bias"):
            out[key] = 0.02 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            out[key] = 0.05 + 0.3 * torch.rand(shape, generator=g)
        else:
            out[key] = 0.5 * torch.randn(shape, generator=g) / float(np.prod(shape[1:])) ** 0.5
    return out


def disk_frames(positions: Sequence[float], height: int, width: int, radius: float = 22.0) -> np.ndarray:
    """uint8 ``[F, H, W, 3]``: a shaded disk centred at x = positions[f] over a textured background."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    background = 0.45 + 0.2 * np.sin(xx / 6.0) * np.cos(yy / 9.0) + 0.1 * np.sin((xx + 2 * yy) / 17.0)
    frames = []
    for cx in positions:
        img = background.copy()
        inside = (xx - cx) ** 2 + (yy - height / 2) ** 2 < radius**2
        img[inside] = 0.9 - 0.5 * (xx[inside] - cx + radius) / (2 * radius) + 0.05 * np.sin(yy[inside] / 2.0)
        rgb = np.stack([img, 0.85 * img + 0.1, 1.0 - img], axis=-1)
        frames.append(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))
    return np.stack(frames)


def pair_frames() -> np.ndarray:
    """uint8 ``[2, 128, 128, 3]``: the disk 12 px apart."""
    return disk_frames([56, 68], *PAIR_SIZE)


def video_frames() -> np.ndarray:
    """uint8 ``[5, 117, 131, 3]``: the test video scored through VBench's procedure."""
    return disk_frames(VIDEO_POSITIONS, *VIDEO_SIZE)


def as_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` = levels / 255 (exact in float32, as VBench's img2tensor)."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def shapes() -> dict[str, list[int]]:
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def golden_checkpoint(tmp_path_factory, shapes) -> Path:
    """The golden weights saved as the released file is laid out: ``{"state_dict": ...}``."""
    path = tmp_path_factory.mktemp("amt") / "amt-s.pth"
    torch.save({"state_dict": golden_weights(shapes)}, path)
    return path


@pytest.fixture(scope="module")
def model(golden_checkpoint) -> AMTS:
    return load_amt(golden_checkpoint, "cpu")


def test_state_dict_layout_is_vbench_amt_s(shapes):
    assert len(shapes) == 213 and sum(int(np.prod(s)) for s in shapes.values()) == 2_990_543
    assert amt_shape_manifest(AMTS()) == shapes


def test_network_output_equals_vbench_amt_s(model, reference):
    frames = as_float(pair_frames())
    with torch.no_grad():
        pred = model(frames[:1], frames[1:], 0.5)
    expected = torch.from_numpy(reference["pair_midframe"])
    assert pred.shape == expected.shape == (1, 3, *PAIR_SIZE)
    # Same operations; only float reassociation differs (measured max 8e-7 on CPU).
    assert torch.allclose(pred, expected, atol=1e-4, rtol=0)
    # The weights make a frame that is neither clamped nor a blend of its inputs: the check sees the network.
    assert 0.05 < expected.std() and ((expected == 0) | (expected == 1)).float().mean() < 0.03
    assert (expected - frames.mean(0, keepdim=True)).abs().mean() > 0.05


def test_pairs_of_one_video_batched_equal_one_at_a_time(model):
    keys = as_float(video_frames()[0::2])
    batched = interpolate_midframes(model, keys[:-1], keys[1:])
    single = torch.cat([interpolate_midframes(model, keys[i:i + 1], keys[i + 1:i + 2]) for i in range(2)])
    assert batched.shape == (2, 3, *VIDEO_SIZE)
    assert torch.allclose(batched, single, atol=1e-5, rtol=0)  # measured max ~2e-7
    assert torch.equal(interpolate_midframes(model, keys[:-1], keys[1:], max_pairs=1), single)  # chunks of one
    diff = np.abs(to_uint8_truncated(batched).astype(int) - to_uint8_truncated(single).astype(int))
    # A value within float noise of an integer may truncate to the neighbouring level (measured: 1 of 91962).
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_padding_follows_vbench_input_padder():
    # (left, right, top, bottom): the odd pixel goes to the right / bottom.
    assert pad_amounts(*VIDEO_SIZE) == (6, 7, 5, 6)
    assert pad_amounts(128, 144) == (0, 0, 0, 0)
    assert pad_amounts(250, 320) == (0, 0, 3, 3)


def test_motion_smoothness_with_amt_equals_vbench_score(golden_checkpoint, reference):
    scorer = MotionSmoothness(device="cpu", interpolator="amt", amt_weights=str(golden_checkpoint))
    assert scorer.interpolator == "amt" and scorer.flow is None
    assert scorer.needs_weights and scorer.version == "vbench-motion_smoothness-1/amt-s"
    assert scorer.describe()["weights"] == {"amt": str(golden_checkpoint)}
    frames = video_frames()
    video = as_float(frames)
    assert np.array_equal(to_frames_uint8(video), frames)  # the scorer sees exactly these 8-bit frames
    mids = scorer.midframes(frames)
    expected_mids = reference["video_midframes"]
    assert mids.shape == expected_mids.shape == (2, *VIDEO_SIZE, 3)
    diff = np.abs(mids.astype(int) - expected_mids.astype(int))
    # Truncation to uint8 can flip a level where a value sits within float noise of an integer
    # (measured on CPU: none of the 91962 values differ).
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    score = scorer(video[None], ["a disk"]).item()
    expected = float(reference["video_score"])
    # VBench's score is (255 - MAE) / 255 of its midframes against the odd frames 1 and 3.
    mae = np.abs(expected_mids.astype(float) - frames[1::2][:2].astype(float)).mean()
    assert expected == pytest.approx((255.0 - mae) / 255.0, abs=1e-12)
    assert 0.0 <= score <= 1.0 and 0.5 < expected < 0.999
    # One flipped level moves the score by 1 / (255 * 2 * 117 * 131 * 3) = 4e-8; 1e-6 allows ~20 of them.
    assert score == pytest.approx(expected, abs=1e-6)


def test_amt_weights_from_the_weights_dir_and_auto(golden_checkpoint, tmp_path, monkeypatch, reference):
    (tmp_path / "amt").mkdir()
    (tmp_path / AMT_FILE).write_bytes(golden_checkpoint.read_bytes())
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    scorer = MotionSmoothness(device="cpu", interpolator="auto")
    assert scorer.interpolator == "amt" and scorer.describe()["weights"] == {"amt": str(tmp_path / AMT_FILE)}
    assert MotionSmoothness(device="cpu", interpolator="amt").amt is scorer.amt  # loaded once per process
    score = scorer(as_float(video_frames())[None], ["a"]).item()
    assert score == pytest.approx(float(reference["video_score"]), abs=1e-6)
    monkeypatch.delenv(WEIGHTS_ENV)
    fallback = MotionSmoothness(device="cpu", interpolator="auto")
    assert fallback.interpolator == "flow" and not fallback.needs_weights


def test_missing_amt_weights_name_the_scorer_and_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match=r"^motion_smoothness: needs amt/amt-s\.pth .*AMT-S checkpoint"):
        MotionSmoothness(device="cpu", interpolator="amt")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"motion_smoothness: weights file .*amt/amt-s\.pth .*amt_weights"):
        MotionSmoothness(device="cpu", interpolator="amt")
    with pytest.raises(MissingWeightsError, match=r"weights file /nope/amt-s\.pth \(option `amt_weights`\)"):
        MotionSmoothness(device="cpu", interpolator="amt", amt_weights="/nope/amt-s.pth")


def test_wrong_checkpoints_are_refused_naming_the_file(tmp_path, shapes):
    weights = golden_weights(shapes)
    del weights["comb_block.0.bias"]
    weights["decoder1.convblock.2.bias"] = torch.zeros(25)
    weights["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "not-amt.pth"
    torch.save({"state_dict": weights}, bad)
    with pytest.raises(UserError, match=r"not-amt\.pth: not an AMT-S checkpoint .*missing: comb_block\.0\.bias; "
                                        r"unexpected: extra\.weight; wrong shape: decoder1\.convblock\.2\.bias"):
        load_amt(bad)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"garbage\.pth: not a readable checkpoint"):
        load_amt(garbage)


def test_small_frames_and_bad_options_are_refused(golden_checkpoint):
    scorer = MotionSmoothness(device="cpu", interpolator="amt", amt_weights=str(golden_checkpoint))
    # `videotuna score` asks unscorable() first and records such videos as failed with this reason.
    assert scorer.unscorable(3, 112, 160).startswith("AMT-S needs frames of at least 113 px")
    assert scorer.unscorable(3, 113, 160) is None and scorer.unscorable(2, 256, 256) == "needs at least 3 frames, got 2"
    with pytest.raises(ValueError, match=r"motion_smoothness: AMT-S needs frames of at least 113 px .*got 112x160"):
        scorer(torch.rand(2, 3, 3, 112, 160), ["a", "b"])
    with pytest.raises(UserError, match=r"^AMT-S needs frames of at least 113 px .*got 128x100"):
        interpolate_midframes(scorer.amt, torch.rand(1, 3, 128, 100), torch.rand(1, 3, 128, 100))
    with pytest.raises(UserError, match="unknown interpolator 'rife'"):
        MotionSmoothness(device="cpu", interpolator="rife")
    with pytest.raises(UserError, match=r"option\(s\) flow do not apply to the 'amt' backend"):
        MotionSmoothness(device="cpu", interpolator="amt", amt_weights=str(golden_checkpoint), flow="raft")


def test_score_run_records_frames_too_small_for_amt_as_failed_and_scores_the_rest(golden_checkpoint, tmp_path):
    from videotuna_dpo.data.scores import read_scores
    from videotuna_dpo.data.video_io import write_video
    from videotuna_dpo.pipeline.score import score_videos

    videos = tmp_path / "videos"
    write_video(videos / "small.mp4", torch.rand(5, 3, 64, 96), lossless=True)
    write_video(videos / "large.mp4", torch.rand(5, 3, 128, 128), lossless=True)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"small.mp4": "a", "large.mp4": "b"}))
    summary = score_videos(videos=str(videos), out=str(tmp_path / "scores.jsonl"), prompts=str(prompts),
                           scorers=["motion_smoothness"], device="cpu", progress=False,
                           options={"motion_smoothness": {"interpolator": "amt", "amt_weights": str(golden_checkpoint)}})
    assert summary["scored"] == 1 and summary["failed"] == 1
    records = {Path(p).name: r for p, r in read_scores(tmp_path / "scores.jsonl").items()}
    assert records["small.mp4"]["status"] == "failed"
    assert records["small.mp4"]["reason"].startswith("motion_smoothness: AMT-S needs frames of at least 113 px")
    assert records["large.mp4"]["status"] == "ok" and 0 < records["large.mp4"]["raw"]["motion_smoothness"] <= 1
