"""dynamic_degree with RAFT as VBench computes it, from VBench's own checkpoint layout (raft-things.pth).

``tests/fixtures/make_raft_reference.py`` ran VBench's RAFT (princeton-vl's code) and VBench's
``DynamicDegree.infer`` on ``fill_deterministic`` weights; here the same weights, built from the
committed key manifest alone and saved ``module.``-prefixed as the released file is, go through our
key renaming into torchvision's ``raft_large`` and must give VBench's flow, per-pair magnitudes and
0/1 score. VBench is not needed.

Tolerances: both code bases run the same float32 operations in the same order (in one process, one
pair, our flow equals VBench's bit for bit); what is left is the summation order inside matrix
products (batch of pairs, thread count), amplified by 20 recurrent iterations. Measured on 1 and 2
threads: at most 3e-6 px on the pair flow, 5e-7 on the clip's magnitudes (bitwise equal when pairs
run one at a time on 1 thread). 1e-4 px leaves a margin of 30 over that and is still 200 times
smaller than the gaps that decide the score (nearest magnitude 0.022 px from the threshold).
"""

import json

import numpy as np
import pytest
import torch

from tests.fixtures.make_raft_reference import CLIP, CLIP_FPS, MANIFEST, REFERENCE, pair_frames, princeton_state
from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import WEIGHTS_ENV, MissingWeightsError
from videotuna_dpo.scoring.flow import (
    RAFT_FILE,
    RAFT_VBENCH_FILES,
    load_raft,
    princeton_raft_to_torchvision,
    raft_checkpoint_format,
    raft_padding,
)
from videotuna_dpo.scoring.motion import DynamicDegree, dynamic_threshold, is_dynamic

FLOW_ATOL = 1e-4  # px; see the module docstring


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


@pytest.fixture(scope="module")
def vbench_checkpoint(manifest, tmp_path_factory):
    """The reference's weights in the layout of VBench's raft-things.pth: ``module.fnet.conv1.weight``, ..."""
    path = tmp_path_factory.mktemp("raft") / "raft-things.pth"
    torch.save({f"module.{k}": v for k, v in princeton_state(manifest).items()}, path)
    return path


@pytest.fixture(scope="module")
def scorer(vbench_checkpoint):
    return DynamicDegree(device="cpu", flow="raft", raft_weights=str(vbench_checkpoint), fps=CLIP_FPS)


def test_every_princeton_tensor_maps_onto_torchvision_raft_large(manifest):
    from torchvision.models.optical_flow import raft_large

    princeton = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                 for k, (shape, dtype) in manifest.items()}
    assert raft_checkpoint_format(princeton) == "princeton"
    converted = princeton_raft_to_torchvision(princeton)
    with torch.device("meta"):
        target = raft_large(weights=None).state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in converted.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in target.items()
    }
    # The only keys left out are the second names of the context encoder's downsampling norms.
    aliases = [k for k in manifest if ".norm3." in k]
    assert len(aliases) == len(manifest) - len(target) == 10
    twins = [k.replace(".norm3.", ".downsample.1.") for k in aliases]
    assert all(k.startswith("cnet.") and manifest[k] == manifest[t] for k, t in zip(aliases, twins))


def test_raft_pads_as_vbench_and_to_128_px_below_it():
    assert raft_padding(122, 126) == ((1, 1, 3, 3), (1, 1, 3, 3))  # InputPadder 'sintel': half before
    assert raft_padding(320, 512) == ((0, 0, 0, 0), (0, 0, 0, 0))
    assert raft_padding(60, 131) == ((2, 3, 2, 2), (2, 3, 34, 34))  # VBench's own RAFT gives NaN under 128


def test_flow_equals_vbench_raft_on_the_same_weights(reference, scorer):
    frames = pair_frames()
    padded = scorer.flow.pairs(frames, [(0, 1)], vbench_padded=True)[0]
    expected = reference["pair_flow"].transpose(1, 2, 0)
    assert padded.shape == expected.shape == (128, 128, 2)
    np.testing.assert_allclose(padded, expected, rtol=0, atol=FLOW_ATOL)
    # Not a comparison of constants: the flow varies over the frame by far more than the tolerance.
    assert np.ptp(expected[..., 0]) > 1.0 and np.ptp(expected[..., 1]) > 1.0
    # The frame's own flow is the padded one without VBench's 3 rows and 1 column of padding.
    own = scorer.flow(frames[:1], frames[1:])[0]
    np.testing.assert_array_equal(own, padded[3:125, 1:127])


def test_dynamic_degree_scores_the_clip_as_vbench(reference, scorer):
    assert scorer.version == "vbench-dynamic_degree-2/raft-large" and scorer.flow_short_side is None
    clip = read_video(CLIP).float().div(255)
    assert tuple(clip.shape) == (11, 3, 122, 150)
    mags, (h, w), n = scorer.pair_magnitudes(clip)
    assert n == 6 and (h, w) == (122, 150)  # 16 fps: every 2nd frame, at full size
    np.testing.assert_allclose(mags, reference["clip_magnitudes"], rtol=0, atol=FLOW_ATOL)
    threshold = dynamic_threshold(h, w)
    assert threshold == reference["clip_threshold"] and round(4 * n / 16) == reference["clip_count_num"] == 2
    # The reference sits on the count boundary: exactly the required 2 pairs of 5 are above the threshold.
    assert int((reference["clip_magnitudes"] > threshold).sum()) == 2
    assert scorer(clip[None], ["a clip"]).tolist() == [float(reference["clip_dynamic"])] == [1.0]
    assert not is_dynamic(sorted(mags)[:4], h, w, n)  # one pair fewer above it: static
    # VBench's rule with 2 sampled frames asks for round(0.5) = 0 pairs; a single frame is never dynamic.
    assert is_dynamic([0.0], h, w, 2) and not is_dynamic([], h, w, 1)


def test_vbench_and_torchvision_layouts_load_the_same_weights(manifest, vbench_checkpoint, tmp_path):
    from torchvision.models.optical_flow import raft_large

    ours = load_raft(vbench_checkpoint).state_dict()
    tv_path = tmp_path / "raft_large_C_T_V2-1bb1363a.pth"
    torch.save(princeton_raft_to_torchvision(princeton_state(manifest)), tv_path)
    from_tv = load_raft(tv_path).state_dict()
    assert ours.keys() == from_tv.keys() and all(torch.equal(v, from_tv[k]) for k, v in ours.items())
    # A file saved from torchvision's own raft_large still loads, strictly and unchanged.
    torch.manual_seed(0)
    native = raft_large(weights=None).state_dict()
    torch.save(native, tv_path)
    assert raft_checkpoint_format(native) == "torchvision"
    loaded = load_raft(tv_path).state_dict()
    assert loaded.keys() == native.keys() and all(torch.equal(v, native[k]) for k, v in loaded.items())


def test_weights_dir_lookup_takes_torchvision_name_then_vbench_names(vbench_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        DynamicDegree(device="cpu", flow="raft")
    message = str(info.value)
    assert all(name in message for name in (RAFT_FILE, *RAFT_VBENCH_FILES, "raft-things.pth", "raft_weights"))
    (tmp_path / "raft").mkdir()
    for name in RAFT_VBENCH_FILES[::-1]:
        (tmp_path / name).write_bytes(vbench_checkpoint.read_bytes())
        assert DynamicDegree(device="cpu", flow="raft").weights_used == {"raft": str(tmp_path / name)}
    torch.save({"x": torch.zeros(1)}, tmp_path / RAFT_FILE)  # the torchvision name comes first
    with pytest.raises(UserError, match=r"raft_large_C_T_V2-1bb1363a\.pth: not a RAFT-large checkpoint"):
        DynamicDegree(device="cpu", flow="raft")


def test_a_file_of_neither_layout_is_refused_by_name(manifest, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"module.visual.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"other\.pth: not a RAFT-large checkpoint"):
        load_raft(path)
    state = princeton_state(manifest)
    torch.save({**state, "fnet.layer1.0.conv3.weight": torch.zeros(1)}, path)  # as in raft-small's bottlenecks
    with pytest.raises(UserError, match=r"other\.pth: princeton-vl RAFT checkpoint of another .*layer1\.0\.conv3"):
        load_raft(path)
    del state["update_block.mask.2.bias"]
    torch.save(state, path)
    with pytest.raises(UserError, match=r"other\.pth: princeton RAFT .* RAFT-large: missing mask_predictor\.conv\.bias$"):
        load_raft(path)
