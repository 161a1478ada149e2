"""ViCLIP (overall_consistency as in VBench) against VBench's own ViCLIP code, via committed reference outputs.

``tests/fixtures/make_viclip_reference.py`` ran VBench's modules on ``fill_deterministic`` weights;
here our open_clip-based ViCLIP gets the same weights and must give the same tokens and features,
and ``videotuna score``'s scorer must give the score VBench's ``overall_consistency`` gave for the
committed clip (VBench decodes with decord, we with PyAV: same frames from a lossless file).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.make_viclip_reference import PROMPTS, SMALL, reference_frames
from tests.fixtures.reference_weights import fill_deterministic
from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import WEIGHTS_ENV, MissingWeightsError
from videotuna_dpo.scoring.clip_scorers import VICLIP_FILE, OverallConsistency, middle_frame_indices
from videotuna_dpo.scoring.viclip import ViCLIP, ViCLIPConfig, load_viclip, viclip_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "viclip_reference.npz"))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """The small ViCLIP with the reference's weights, saved the way the released file is: {"model": ...}."""
    model = ViCLIP(ViCLIPConfig(**SMALL))
    fill_deterministic(model, seed=0)
    path = tmp_path_factory.mktemp("viclip") / "viclip.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_state_dict_matches_the_released_l14_architecture():
    expected = json.loads((FIXTURES / "viclip_l14_keys.json").read_text())
    with torch.device("meta"):
        model = ViCLIP()  # the released sizes
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected


def test_tokens_equal_vbench_tokenizer_including_cleaning_and_truncation(reference):
    tokens = viclip_tokenizer(32)(PROMPTS)
    assert torch.equal(tokens.long(), torch.from_numpy(reference["tokens"]))
    assert tokens[2, -1].item() == 49407  # truncated prompt ends with <|endoftext|>


def test_features_equal_vbench_viclip_on_the_same_weights(reference, small_checkpoint):
    model = load_viclip(small_checkpoint)
    assert model.cfg == ViCLIPConfig(**SMALL)  # sizes read off the checkpoint
    with torch.no_grad():
        video = model.vision_encoder(reference_frames().transpose(1, 2))
        text = model.text_encoder(torch.from_numpy(reference["tokens"]))
    np.testing.assert_allclose(video.numpy(), reference["video"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(text.numpy(), reference["text"], rtol=0, atol=2e-5)
    assert np.abs(reference["video"]).max() > 0.05  # the comparison is not between near-zeros


def test_overall_consistency_scores_a_file_as_vbench_does(reference, small_checkpoint, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(small_checkpoint.parent))
    scorer = OverallConsistency(device="cpu", viclip_weights=str(small_checkpoint))
    assert scorer.backend == "viclip" and scorer.version == "vbench-overall_consistency-1/viclip"
    assert scorer.describe()["weights"] == {"viclip": str(small_checkpoint)}
    clip = read_video(FIXTURES / "viclip_clip.mp4").float().div(255)[None]
    got = scorer(clip, [PROMPTS[0]])
    assert got.item() == pytest.approx(float(reference["clip_score"]), abs=1e-5)
    # A batch scores each video as alone.
    both = scorer(torch.cat([clip, clip.flip(1)]), [PROMPTS[0], PROMPTS[1]])
    assert both[0].item() == pytest.approx(got.item(), abs=1e-6)
    assert both[1].item() == pytest.approx(scorer(clip.flip(1), [PROMPTS[1]]).item(), abs=1e-6)
    one_clip_per_pass = OverallConsistency(device="cpu", viclip_weights=str(small_checkpoint), frame_chunk=8)
    assert torch.allclose(one_clip_per_pass(torch.cat([clip, clip.flip(1)]), [PROMPTS[0], PROMPTS[1]]), both, atol=1e-6)
    # A clip shorter than 8 frames repeats its last frame (VBench's reader), ViCLIP always sees 8.
    short = clip[:, :5]
    padded = clip[:, [0, 1, 2, 3, 4, 4, 4, 4]]
    assert scorer(short, [PROMPTS[1]]).item() == pytest.approx(scorer(padded, [PROMPTS[1]]).item(), abs=1e-6)
    assert middle_frame_indices(8, 5, pad=True) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_auto_backend_takes_viclip_from_the_weights_dir_else_clip(small_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "viclip").mkdir()
    (tmp_path / VICLIP_FILE).write_bytes(small_checkpoint.read_bytes())
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert OverallConsistency(device="cpu").backend == "viclip"
    (tmp_path / VICLIP_FILE).unlink()
    # No ViCLIP and no CLIP: the error names CLIP's file and says where ViCLIP would go.
    with pytest.raises(MissingWeightsError, match=r"overall_consistency: weights file .*clip/ViT-L-14\.pt"):
        OverallConsistency(device="cpu")
    with pytest.raises(MissingWeightsError, match=r"ViClip-InternVid-10M-FLT\.pth"):
        OverallConsistency(device="cpu", backend="viclip")
    with pytest.raises(UserError, match="unknown backend 'internvideo'"):
        OverallConsistency(device="cpu", backend="internvideo")


def test_a_file_that_is_not_viclip_is_refused_by_name(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"visual.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match=r"other\.pth: not a ViCLIP checkpoint"):
        load_viclip(path)
    broken = ViCLIP(ViCLIPConfig(**{**SMALL, "text_layers": 1})).state_dict()
    broken["vision_encoder.extra"] = torch.zeros(1)
    torch.save(broken, path)
    with pytest.raises(UserError, match=r"do not match the architecture .*vision_encoder\.extra"):
        load_viclip(path)
