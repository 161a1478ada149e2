"""Model-based scorers end to end on random-weight models loaded from a weights directory; missing weights."""

import json
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

from videotuna_dpo.errors import UserError
from videotuna_dpo.scoring.base import WEIGHTS_ENV, MissingWeightsError
from videotuna_dpo.scoring.clip_scorers import (
    AESTHETIC_FILE,
    CLIP_FILE,
    AestheticQuality,
    OverallConsistency,
    clip_preprocess,
    middle_frame_indices,
)
from videotuna_dpo.scoring.dino import (
    DINO_FILE,
    SubjectConsistency,
    consistency_from_features,
    dino_features,
    dino_preprocess,
)
from videotuna_dpo.scoring.imaging import ImagingQuality
from videotuna_dpo.scoring.motion import DynamicDegree

TINY_CLIP = "videotuna-test-tiny-clip"
TINY_DINO = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """A $VIDEOTUNA_WEIGHTS tree of random weights: a tiny ViT (DINO slot), a tiny CLIP and its head."""
    import open_clip
    import timm

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    (root / "dino").mkdir()
    dino = timm.create_model(TINY_DINO, pretrained=False, num_classes=0)
    torch.save(dino.state_dict(), root / DINO_FILE)

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (root / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{TINY_CLIP}.json")
    clip = open_clip.create_model(TINY_CLIP, pretrained=None)
    (root / "clip").mkdir()
    torch.save(clip.state_dict(), root / CLIP_FILE)
    (root / "aesthetic").mkdir()
    torch.save(torch.nn.Linear(32, 1).state_dict(), root / AESTHETIC_FILE)
    return root


def video_batch(seed=0) -> torch.Tensor:
    """[2, 5, 3, 40, 48]: a static video and a noisy one."""
    g = torch.Generator().manual_seed(seed)
    still = torch.rand(1, 1, 3, 40, 48, generator=g).expand(1, 5, 3, 40, 48)
    noisy = torch.rand(1, 5, 3, 40, 48, generator=g)
    return torch.cat([still, noisy]).contiguous()


def test_consistency_from_features_matches_hand_computation():
    feats = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])
    # i=1: cos(f0,f1)=cos(f0,f1)=0.7071 -> 0.7071; i=2: cos(f1,f2)=-0.7071 -> 0, cos(f0,f2)=-1 -> 0.
    expected = (2 ** -0.5 + 0.0) / 2
    assert consistency_from_features(feats).item() == pytest.approx(expected, abs=1e-12)


def test_subject_consistency_runs_on_a_random_vit_from_the_weights_dir(weights_dir, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    scorer = SubjectConsistency(device="cpu", model_name=TINY_DINO)
    assert scorer.needs_weights and scorer.describe()["weights"] == {"dino": str(weights_dir / DINO_FILE)}
    videos = video_batch()
    scores = scorer(videos, ["a", "b"])
    assert scores[0].item() == pytest.approx(1.0, abs=1e-6)  # identical frames
    feats = dino_features(scorer.model, dino_preprocess(videos[1], 224)).reshape(1, 5, -1)
    assert scores[1].item() == pytest.approx(consistency_from_features(feats).item(), abs=1e-6)
    assert scores[1].item() < 1.0
    # 40x48 -> short side 224 -> 224x268 (torchvision truncates int(224 * 48 / 40) = 268).
    assert dino_preprocess(videos[0], 224).shape[-2:] == (224, 268)
    # On a square input of the trained size the features are timm's own forward.
    square = torch.rand(2, 3, 224, 224)
    assert torch.allclose(dino_features(scorer.model, square), scorer.model(square), atol=1e-5)


def test_aesthetic_quality_is_the_head_over_normalised_clip_features(weights_dir, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    scorer = AestheticQuality(device="cpu", model_name=TINY_CLIP)
    videos = video_batch(1)
    got = scorer(videos, ["a", "b"])
    frames = videos.reshape(10, 3, 40, 48)
    feats = F.normalize(scorer.model.encode_image(clip_preprocess(frames, 32)), dim=-1)
    head = torch.load(weights_dir / AESTHETIC_FILE)
    expected = ((feats @ head["weight"].T + head["bias"]).reshape(2, 5) / 10).mean(1)
    assert torch.allclose(got.float(), expected, atol=1e-5)
    assert set(scorer.describe()["weights"]) == {"clip", "aesthetic_head"}


def test_overall_consistency_is_text_video_cosine_over_eight_middle_frames(weights_dir, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    scorer = OverallConsistency(device="cpu", model_name=TINY_CLIP)
    assert scorer.kind == "semantic"
    # Loaded once per process: aesthetic_quality and overall_consistency share the CLIP model.
    assert scorer.backend == "clip" and scorer.version == f"overall_consistency-clip-2/{TINY_CLIP}"
    assert scorer.clip.model is AestheticQuality(device="cpu", model_name=TINY_CLIP).model
    assert middle_frame_indices(8, 16) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert middle_frame_indices(8, 5) == [0, 1, 2, 3, 4]
    videos = video_batch(2)
    prompts = ["a red fox in snow", "a city at night"]
    got = scorer(videos, prompts)
    model = scorer.clip.model
    image = F.normalize(model.encode_image(clip_preprocess(videos.reshape(10, 3, 40, 48), 32)), dim=-1)
    video = F.normalize(image.reshape(2, 5, -1).mean(1), dim=-1)
    text = F.normalize(model.encode_text(scorer.clip.tokenizer(prompts)), dim=-1)
    assert torch.allclose(got.float(), (video * text).sum(-1), atol=1e-5)
    swapped = scorer(videos, prompts[::-1])
    assert not torch.allclose(got, swapped)


def test_missing_weights_name_the_scorer_the_file_and_what_to_put_there(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError) as info:
        SubjectConsistency(device="cpu")
    message = str(info.value)
    assert message.startswith("subject_consistency:") and WEIGHTS_ENV in message and DINO_FILE in message
    assert "dino_vitbase16_pretrain.pth" in message

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    with pytest.raises(MissingWeightsError) as info:
        AestheticQuality(device="cpu")
    assert str(tmp_path / AESTHETIC_FILE) in str(info.value) and "LAION aesthetic predictor" in str(info.value)
    (tmp_path / "aesthetic").mkdir()
    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / AESTHETIC_FILE)
    with pytest.raises(MissingWeightsError, match=r"aesthetic_quality: weights file .*clip/ViT-L-14\.pt"):
        AestheticQuality(device="cpu")
    with pytest.raises(MissingWeightsError, match=r"overall_consistency: weights file /nope/clip\.pt \(option `clip_weights`\)"):
        OverallConsistency(device="cpu", clip_weights="/nope/clip.pt")
    with pytest.raises(MissingWeightsError, match=r"imaging_quality: .*musiq_spaq_ckpt"):
        ImagingQuality(device="cpu", backend="musiq")
    with pytest.raises(MissingWeightsError, match=r"dynamic_degree: .*raft/raft_large_C_T_V2-1bb1363a\.pth"):
        DynamicDegree(device="cpu", flow="raft")
    with pytest.raises(UserError, match="unknown backend 'brisque'"):
        ImagingQuality(device="cpu", backend="brisque")


def test_musiq_backend_needs_pyiqa_when_its_checkpoint_is_present(tmp_path, monkeypatch):
    import sys

    for module in ("pyiqa", "pyiqa.archs", "pyiqa.archs.musiq_arch"):
        monkeypatch.setitem(sys.modules, module, None)  # as if pyiqa were not installed
    ckpt = tmp_path / "musiq.pth"
    torch.save({}, ckpt)
    with pytest.raises(MissingWeightsError, match="pip install pyiqa"):
        ImagingQuality(device="cpu", backend="auto", musiq_weights=str(ckpt))


def test_dynamic_degree_with_raft_from_a_local_checkpoint(tmp_path):
    from torchvision.models.optical_flow import raft_large

    torch.manual_seed(0)
    ckpt = tmp_path / "raft.pth"
    torch.save(raft_large(weights=None).state_dict(), ckpt)
    scorer = DynamicDegree(device="cpu", flow="raft", raft_weights=str(ckpt), raft_iters=2)
    assert scorer.needs_weights and scorer.version.endswith("raft-large")
    assert scorer.describe()["weights"] == {"raft": str(ckpt)}
    # 60x68 frames are padded to RAFT's 128 px minimum and the flow cropped back.
    mags, (h, w), n = scorer.pair_magnitudes(torch.rand(3, 3, 60, 68))
    assert mags.shape == (2,) and (h, w, n) == (60, 68, 3)
    assert bool((mags >= 0).all())


def test_options_the_chosen_backend_ignores_are_refused(tmp_path, monkeypatch):
    from videotuna_dpo.scoring.motion import MotionSmoothness

    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError, match=r"imaging_quality: option\(s\) musiq_weights do not apply to the 'niqe'"):
        ImagingQuality(device="cpu", backend="niqe", musiq_weights="/some/musiq.pth")
    with pytest.raises(UserError, match=r"overall_consistency: option\(s\) viclip_weights do not apply to the 'clip'"):
        OverallConsistency(device="cpu", backend="clip", viclip_weights="/some/viclip.pth")
    with pytest.raises(UserError, match=r"motion_smoothness: option\(s\) amt_max_pairs do not apply to the 'flow'"):
        MotionSmoothness(device="cpu", amt_max_pairs=4)  # auto without AMT-S weights: flow
    # An explicit AMT-S file makes auto pick AMT-S (and a missing one is then an error, not ignored).
    with pytest.raises(MissingWeightsError, match=r"motion_smoothness: weights file /nope/amt-s\.pth"):
        MotionSmoothness(device="cpu", amt_weights="/nope/amt-s.pth")


def test_weight_files_that_pickle_objects_or_are_corrupt_are_refused_naming_scorer_and_file(tmp_path, monkeypatch):
    import argparse

    monkeypatch.delenv("VIDEOTUNA_TRUST_WEIGHTS", raising=False)
    dino = tmp_path / "dino.pth"
    timm_state = __import__("timm").create_model(TINY_DINO, pretrained=False, num_classes=0).state_dict()
    torch.save({"model": timm_state, "args": argparse.Namespace(arch="vit")}, dino)
    with pytest.raises(UserError, match=r"subject_consistency: .*dino\.pth: this checkpoint holds pickled Python "
                                        r"objects .*set VIDEOTUNA_TRUST_WEIGHTS=1"):
        SubjectConsistency(device="cpu", weights=str(dino), model_name=TINY_DINO)
    monkeypatch.setenv("VIDEOTUNA_TRUST_WEIGHTS", "1")  # the user vouches for the file
    assert SubjectConsistency(device="cpu", weights=str(dino), model_name=TINY_DINO).weights_used["dino"] == str(dino)
    broken = tmp_path / "broken.pth"
    broken.write_bytes(dino.read_bytes()[:200])
    with pytest.raises(UserError, match=r"subject_consistency: .*broken\.pth: not a readable checkpoint"):
        SubjectConsistency(device="cpu", weights=str(broken), model_name=TINY_DINO)
    with pytest.raises(UserError, match=r"overall_consistency: .*broken\.pth: not a readable checkpoint"):
        OverallConsistency(device="cpu", viclip_weights=str(broken))
    with pytest.raises(UserError, match=r"aesthetic_quality: cannot load .*broken\.pth as open_clip's"):
        AestheticQuality(device="cpu", clip_weights=str(broken), head_weights=str(dino))


class _WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) writes a file of its choosing."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        torch.ops.aten.save(torch.zeros(1), state[0])


def test_a_torchscript_clip_file_is_read_without_running_its_code(weights_dir, tmp_path, monkeypatch):
    written = tmp_path / "written_by_payload"
    archive = tmp_path / "ViT-L-14.pt"
    torch.jit.script(_WritesOnLoad(str(written))).save(str(archive))
    head = tmp_path / "head.pth"
    torch.save(torch.nn.Linear(32, 1).state_dict(), head)
    for trust in ("0", "1"):  # trusting weights files does not make an archive's code run either
        monkeypatch.setenv("VIDEOTUNA_TRUST_WEIGHTS", trust)
        with pytest.raises(UserError, match=r"aesthetic_quality: .*ViT-L-14\.pt: not a readable TorchScript archive "
                                            r"\(UnpicklingError: __torch__\.[\w.]*_WritesOnLoad restores itself "
                                            r"with its own __setstate__ \(code in the archive, not run here\)"):
            AestheticQuality(device="cpu", clip_weights=str(archive), head_weights=str(head), model_name=TINY_CLIP)
        with pytest.raises(UserError, match=r"overall_consistency: .*ViT-L-14\.pt: not a readable TorchScript"):
            OverallConsistency(device="cpu", clip_weights=str(archive), model_name=TINY_CLIP)
        assert not written.exists()
    torch.jit.load(str(archive))  # the payload is live: loading the archive as TorchScript writes the file
    assert written.is_file()


def test_aesthetic_quality_in_half_precision_agrees_with_fp32(weights_dir, monkeypatch):
    """precision=fp16 is OpenAI CLIP's half precision (VBench's on a GPU): fp16 weights, fp32 layer norms.

    Stated tolerance (the two-layer test CLIP; measured 2.5e-4 and 3e-6): unit CLIP features within 1e-3 of
    fp32's (max abs), scores within 1e-4.
    """
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_dir))
    full = AestheticQuality(device="cpu", model_name=TINY_CLIP)
    half = AestheticQuality(device="cpu", model_name=TINY_CLIP, precision="fp16")
    assert half.model.visual.conv1.weight.dtype == torch.float16 and half.model.visual.ln_pre.weight.dtype == torch.float32
    assert half.version == full.version + "/fp16"  # a scores file refuses to mix the two
    videos = video_batch(2)
    frames = videos.reshape(10, 3, 40, 48)
    f32, f16 = full.image_features(frames), half.image_features(frames)
    assert f16.dtype == torch.float32 and not torch.equal(f16, f32)  # really computed in half precision
    assert (f16 - f32).abs().max().item() < 1e-3
    assert torch.allclose(half(videos, ["a", "b"]), full(videos, ["a", "b"]), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="aesthetic_quality: unknown precision 'bf16'; choose one of fp32, fp16"):
        AestheticQuality(device="cpu", model_name=TINY_CLIP, precision="bf16")
