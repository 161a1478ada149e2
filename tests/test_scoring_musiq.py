"""imaging_quality's MUSIQ backend against VBench's own imaging_quality code (committed reference score).

``tests/fixtures/make_musiq_reference.py`` ran VBench's ``technical_quality`` with pyiqa's MUSIQ on
``fill_deterministic`` weights; here the scorer loads the same weights from a file and must agree.
pyiqa is the optional ``[musiq]`` extra; ``make test`` installs it (without its heavy dependencies).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.make_musiq_reference import SCALE, SEED
from tests.fixtures.reference_weights import fill_deterministic
from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.clip_scorers import clip_preprocess, middle_frame_indices
from videotuna_dpo.scoring.imaging import MUSIQ_FILE, ImagingQuality, cap_longer_side

FIXTURES = Path(__file__).parent / "fixtures"


def test_clip_preprocessing_equals_vbench_for_both_of_its_readers():
    ref = np.load(FIXTURES / "musiq_reference.npz")
    video = read_video(FIXTURES / "musiq_clip.mp4").float().div(255)
    aesthetic = clip_preprocess(video, 224)
    np.testing.assert_allclose(aesthetic[..., ::8, ::8].numpy(), ref["clip_float"], rtol=0, atol=1e-6)
    viclip = clip_preprocess(video[middle_frame_indices(8, 3, pad=True)], 224, uint8_resize=True)
    np.testing.assert_allclose(viclip[..., ::8, ::8].numpy(), ref["clip_uint8"], rtol=0, atol=1e-6)
    assert np.abs(ref["clip_float"] - ref["clip_uint8"][:3]).max() > 1e-3  # the two readers do differ


@pytest.fixture(scope="module")
def musiq_arch():
    return pytest.importorskip("pyiqa.archs.musiq_arch", reason="pyiqa (the [musiq] extra) is not installed")


@pytest.fixture(scope="module")
def musiq_checkpoint(tmp_path_factory, musiq_arch):
    model = musiq_arch.MUSIQ(pretrained=False)
    fill_deterministic(model, seed=SEED, scale=SCALE)
    path = tmp_path_factory.mktemp("musiq") / "musiq.pth"
    torch.save(model.state_dict(), path)
    return path


def test_musiq_scores_a_file_as_vbench_does(musiq_checkpoint, monkeypatch, tmp_path):
    (tmp_path / "musiq").mkdir()
    (tmp_path / MUSIQ_FILE).symlink_to(musiq_checkpoint)
    monkeypatch.setenv("VIDEOTUNA_WEIGHTS", str(tmp_path))
    scorer = ImagingQuality(device="cpu")  # auto: the checkpoint is in the weights directory
    assert scorer.backend == "musiq" and scorer.version == "vbench-imaging_quality-2/musiq-spaq"
    video = read_video(FIXTURES / "musiq_clip.mp4").float().div(255)
    expected = float(np.load(FIXTURES / "musiq_reference.npz")["score"])
    got = scorer(video[None], ["unused"]).item()
    tolerance = 1e-5 * abs(expected)
    assert abs(got - expected) <= tolerance
    # The 512-px cap is VBench's exact resize: a smooth (antialiased) resize gives another score.
    assert cap_longer_side(video).shape[-2:] == (240, 512)
    smooth = torch.nn.functional.interpolate(video, size=(240, 512), mode="bilinear", antialias=True)
    other = scorer._musiq(smooth).mean().item() / 100.0
    # Measured against the tolerance above, not against this machine's rounding error (which varies):
    # the check above would fail the variant by a wide margin (here about 30x).
    assert abs(other - expected) > 10 * tolerance


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path, musiq_arch):
    path = tmp_path / "not_musiq.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"imaging_quality: .*not_musiq\.pth is not a MUSIQ"):
        ImagingQuality(device="cpu", backend="musiq", musiq_weights=str(path))
