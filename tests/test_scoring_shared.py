"""Scorers run together share one set of 8-bit frames, resized frames and optical flow, and score as alone."""

import numpy as np
import pytest
import torch

from videotuna_dpo.scoring.build import score_batch
from videotuna_dpo.scoring.flickering import TemporalFlickering, flickering_score, flickering_score_uint8
from videotuna_dpo.scoring.flow import FlowEstimator
from videotuna_dpo.scoring.imaging import ImagingQuality
from videotuna_dpo.scoring.motion import DynamicDegree, MotionSmoothness
from videotuna_dpo.scoring.motion_magnitude import MotionMagnitude
from videotuna_dpo.scoring.shared_frames import SharedFrames
from videotuna_dpo.toy.world import Spec, render

FRAMES, SIZE = 9, 288  # over the 256 px short side at which dynamic_degree and motion_magnitude measure flow


def toy_batch() -> tuple[torch.Tensor, list[str]]:
    """uint8 ``[4, 9, 3, 288, 288]`` toy-world videos: a clean take, a static, a jittering and a flickering one."""
    specs = [(Spec("red", "square", "right"), None), (Spec("blue", "circle", "up"), "static"),
             (Spec("green", "circle", "left"), "jitter"), (Spec("yellow", "square", "down"), "flicker")]
    videos = torch.stack([render(spec, frames=FRAMES, size=SIZE, flaw=flaw, seed=i)
                          for i, (spec, flaw) in enumerate(specs)])
    return videos, [spec.caption for spec, _ in specs]


class PlainScorer:
    """A contributed scorer that knows only ``__call__(videos, prompts)``: the mean brightness."""

    kind, needs_weights, weights_hint, version = "quality", False, "", "1"

    def __call__(self, videos, prompts):
        return videos.mean(dim=(1, 2, 3, 4))


def no_weights_scorers(imaging: bool = True) -> dict:
    """The no-weights scorers (``imaging``: with the NIQE proxy, which shares nothing), and a plain contributed one."""
    scorers = {"temporal_flickering": TemporalFlickering("cpu"), "dynamic_degree": DynamicDegree("cpu"),
               "motion_smoothness": MotionSmoothness("cpu", interpolator="flow"),
               "motion_magnitude": MotionMagnitude("cpu"), "plain": PlainScorer()}
    if imaging:
        scorers["imaging_quality"] = ImagingQuality("cpu", backend="niqe")
    return scorers


@pytest.mark.parametrize("fps", [8.0, 24.0])  # 24 fps: dynamic_degree keeps every 3rd frame, motion_magnitude all
def test_every_dimension_scores_the_same_alone_and_together(fps):
    levels, prompts = toy_batch()
    videos = levels.float() / 255.0
    scorers = no_weights_scorers(imaging=fps == 8.0)  # NIQE is slow and frame-rate blind: once is enough
    alone = {name: (s(videos, prompts, fps=fps) if getattr(s, "uses_fps", False) else s(videos, prompts)).double()
             for name, s in scorers.items()}
    together = score_batch(scorers, videos, prompts, fps, levels)  # levels: the decoded frames, as videotuna score
    from_floats = score_batch(scorers, videos, prompts, fps)  # levels recomputed from the float batch
    for name in scorers:
        assert torch.equal(together[name], alone[name]), name
        assert torch.equal(from_floats[name], alone[name]), name
    # The scores are the videos' own: the static take has no flicker and no motion, the flickering one flickers.
    assert together["temporal_flickering"][1] == 1.0 and together["temporal_flickering"][3] < 0.95
    assert together["motion_magnitude"][1] == 0.0 and together["motion_magnitude"][0] > 2.0
    assert together["motion_smoothness"][1] == 1.0
    assert together["dynamic_degree"].tolist()[:2] == [1.0, 0.0]


def count_flow_pairs(monkeypatch) -> list[int]:
    """Patch :meth:`FlowEstimator.pairs` to record how many pairs each call measures."""
    counts: list[int] = []
    original = FlowEstimator.pairs

    def counting(self, frames, pairs, vbench_padded=False):
        counts.append(len(pairs))
        return original(self, frames, pairs, vbench_padded)

    monkeypatch.setattr(FlowEstimator, "pairs", counting)
    return counts


def test_three_flow_dimensions_measure_each_pair_once(monkeypatch):
    levels, prompts = toy_batch()
    videos = levels.float() / 255.0
    scorers = {"dynamic_degree": DynamicDegree("cpu"), "motion_magnitude": MotionMagnitude("cpu"),
               "motion_smoothness": MotionSmoothness("cpu", interpolator="flow")}
    counts = count_flow_pairs(monkeypatch)
    for name, scorer in scorers.items():
        scorer(videos, prompts)
    # Alone, per video: dynamic_degree and motion_magnitude each 8 consecutive pairs at 256 px, motion_smoothness
    # 4 pairs of even frames forward and 4 back at 288 px.
    assert sum(counts) == 4 * (8 + 8 + 8)
    counts.clear()
    shared = SharedFrames(videos, levels)
    together = {name: scorer(videos, prompts, shared=shared) for name, scorer in scorers.items()}
    # Together: the consecutive pairs at 256 px once for both; motion_smoothness's pairs are other pairs.
    assert sum(counts) == 4 * (8 + 8) == shared.flow_pairs_computed
    assert counts == [8] * 4 + [8] * 4  # dynamic_degree's call per video, then motion_smoothness's; motion_magnitude none
    # With no room to keep flow, each pair is measured again and the scores do not change.
    counts.clear()
    uncached = SharedFrames(videos, levels, flow_cache_bytes=0)
    for name, scorer in scorers.items():
        assert torch.equal(scorer(videos, prompts, shared=uncached), together[name]), name
    assert sum(counts) == 4 * (8 + 8 + 8)


def test_frames_are_resized_once_per_size():
    levels, _ = toy_batch()
    shared = SharedFrames(levels.float() / 255.0, levels)
    small = shared.resized(0, 256)
    assert small.shape == (FRAMES, 256, 256, 3) and shared.resized(0, 256) is small
    assert shared.resized(0, 300) is shared.frames(0)  # already under 300 px: the frames themselves
    assert shared.resized(0, 128).shape == (FRAMES, 128, 128, 3)
    assert np.array_equal(shared.frames(2), levels[2].permute(0, 2, 3, 1).numpy())


def test_shared_frames_of_another_batch_are_refused():
    levels, prompts = toy_batch()
    videos = levels.float() / 255.0
    shared = SharedFrames(videos)
    with pytest.raises(ValueError, match="shared frames of another batch"):
        DynamicDegree("cpu")(videos[:2].clone(), prompts[:2], shared=shared)
    with pytest.raises(ValueError, match=r"levels must be uint8 of the videos' shape \(4, 9, 3, 288, 288\)"):
        SharedFrames(videos, levels.float())


def test_flickering_through_opencv_equals_the_integer_sum():
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (3, 5, 3, 40, 56), generator=g, dtype=torch.uint8)
    levels[0, ::2] = 0  # the largest differences: 0 <-> 255
    levels[0, 1::2] = 255
    levels[2] = levels[2, :1]  # a still video
    fast = flickering_score_uint8(levels)
    assert torch.equal(fast, flickering_score(levels))
    assert fast[0] == 0.0 and fast[2] == 1.0


def test_flow_pairs_spread_over_threads_equal_the_serial_flow(monkeypatch):
    import threading

    from videotuna_dpo.scoring import flow as flow_module

    levels, _ = toy_batch()
    frames = levels[2].permute(0, 2, 3, 1).contiguous().numpy()  # the jittering take
    pairs = [(i, i + 1) for i in range(FRAMES - 1)] + [(i + 1, i) for i in range(FRAMES - 1)]
    estimator = FlowEstimator("dis")
    monkeypatch.setattr(flow_module, "flow_threads", lambda: 1)
    serial = estimator.pairs(frames, pairs)
    threads = set()
    new_dis = flow_module._new_dis

    def recording():
        threads.add(threading.current_thread().name)
        return new_dis()

    monkeypatch.setattr(flow_module, "flow_threads", lambda: 2)
    monkeypatch.setattr(flow_module, "_new_dis", recording)
    spread = estimator.pairs(frames, pairs)
    assert all(name.startswith("flow") for name in threads) and threads  # measured on the pool's threads
    assert np.array_equal(spread, serial)
    assert np.abs(serial).max() > 1.0  # real motion, not an all-zero flow
