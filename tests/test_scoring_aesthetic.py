"""aesthetic_quality against VBench's aesthetic_quality on OpenAI's CLIP code (committed reference score).

``tests/fixtures/make_aesthetic_reference.py`` ran VBench's ``laion_aesthetic`` with OpenAI's CLIP
class and a linear head on ``fill_deterministic`` weights; the scorer builds the same architecture in
open_clip, loads those weights from files and must give VBench's score.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.make_aesthetic_reference import CLIP_SEED, HEAD_SEED, SCALE, SMALL_CLIP
from tests.fixtures.reference_weights import fill_deterministic
from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.scoring.clip_scorers import AestheticQuality, is_torchscript_archive

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "videotuna-test-vbench-small-clip"


def test_aesthetic_quality_equals_vbench_on_openai_clip_code(tmp_path):
    import open_clip

    embed, image, v_layers, v_width, patch, context, vocab, t_width, t_heads, t_layers = SMALL_CLIP
    config = {"embed_dim": embed, "quick_gelu": True,  # OpenAI's CLIP uses QuickGELU
              "vision_cfg": {"image_size": image, "layers": v_layers, "width": v_width, "patch_size": patch},
              "text_cfg": {"context_length": context, "vocab_size": vocab, "width": t_width, "heads": t_heads,
                           "layers": t_layers}}
    (tmp_path / f"{MODEL}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{MODEL}.json")
    clip = open_clip.create_model(MODEL, pretrained=None)
    torch.save(fill_deterministic(clip, seed=CLIP_SEED, scale=SCALE), tmp_path / "clip.pt")  # OpenAI's keys
    head = torch.nn.Linear(embed, 1)
    torch.save(fill_deterministic(head, seed=HEAD_SEED, scale=1.0), tmp_path / "head.pth")

    scorer = AestheticQuality(device="cpu", clip_weights=str(tmp_path / "clip.pt"),
                              head_weights=str(tmp_path / "head.pth"), model_name=MODEL)
    video = read_video(FIXTURES / "musiq_clip.mp4").float().div(255)
    expected = float(np.load(FIXTURES / "aesthetic_reference.npz")["score"])
    assert scorer(video[None], ["unused"]).item() == pytest.approx(expected, abs=1e-6)

    # OpenAI ships ViT-L-14.pt as a TorchScript archive (with its sizes as extra buffers): same weights, same score.
    state = torch.load(tmp_path / "clip.pt")
    state["input_resolution"] = torch.tensor(image)
    archive = torch.jit.script(_module_holding(state))
    archive.save(str(tmp_path / "clip_jit.pt"))
    assert is_torchscript_archive(tmp_path / "clip_jit.pt") and not is_torchscript_archive(tmp_path / "clip.pt")
    from_jit = AestheticQuality(device="cpu", clip_weights=str(tmp_path / "clip_jit.pt"),
                                head_weights=str(tmp_path / "head.pth"), model_name=MODEL)
    assert from_jit(video[None], ["unused"]).item() == pytest.approx(expected, abs=1e-6)


class _Root(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module_holding(state: dict) -> torch.nn.Module:
    """A scriptable module whose state dict is ``state`` (nested submodules, tensors as buffers)."""
    root = _Root()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                setattr(module, name, torch.nn.Module())
            module = getattr(module, name)
        module.register_buffer(leaf, value.clone())
    return root
