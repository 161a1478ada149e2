"""subject_consistency against VBench's subject_consistency on DINO's own ViT (committed reference).

``tests/fixtures/make_dino_reference.py`` ran VBench's code with facebookresearch/dino's ViT-S/16 on
``fill_deterministic`` weights; the scorer loads the same weights (DINO's key layout) into timm.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.make_dino_reference import SCALE, SEED
from tests.fixtures.reference_weights import fill_deterministic
from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.scoring.dino import SubjectConsistency, dino_features, dino_position_embedding, dino_preprocess

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "vit_small_patch16_224.dino"


def test_subject_consistency_equals_vbench_on_dino_code(tmp_path):
    import timm

    model = timm.create_model(MODEL, pretrained=False, num_classes=0)
    state = fill_deterministic(model, seed=SEED, scale=SCALE)  # DINO's keys are timm's keys
    torch.save({k: v for k, v in state.items()}, tmp_path / "dino.pth")
    scorer = SubjectConsistency(device="cpu", weights=str(tmp_path / "dino.pth"), model_name=MODEL)
    ref = np.load(FIXTURES / "dino_reference.npz")
    video = read_video(FIXTURES / "viclip_clip.mp4").float().div(255)
    images = dino_preprocess(video[:1])
    assert images.shape[-2:] == (224, 298)  # 96x128 -> 224x298; whole patches: a 14x18 grid
    with torch.no_grad():
        first = dino_features(scorer.model, images)
        timm_first = scorer.model(images[..., :288])  # timm's own position-embedding resize
    np.testing.assert_allclose(first.numpy(), ref["first_feature"], rtol=0, atol=2e-5)
    assert np.abs(timm_first.numpy() - ref["first_feature"]).max() > 10 * 2e-5  # why dino_features exists
    assert scorer(video[None], ["unused"]).item() == pytest.approx(float(ref["score"]), abs=1e-6)
    # DINO resamples the table for any non-square image, even one whose patch grid is square.
    table = scorer.model.pos_embed
    assert torch.equal(dino_position_embedding(table, 14, 14, square_image=True), table)
    resampled = dino_position_embedding(table, 14, 14, square_image=False)
    assert resampled.shape == table.shape and not torch.allclose(resampled, table)
