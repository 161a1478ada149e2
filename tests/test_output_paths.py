"""An output path a verb cannot write (a file, a directory, no permission) is named before any model or scorer loads."""

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT
from videotuna_dpo.errors import UserError

CONFIG = ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"


class NothingLoads:
    """A registry that fails the test when a verb loads a model, datamodule or scorer."""

    def get(self, kind, name):
        raise AssertionError(f"a {kind} was loaded before the output path was checked")

    def names(self, kind):
        return []


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create files in: mode 0555, or /sys for root (which ignores modes)."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


def _directory_verbs(tmp_path):
    """Each verb writing a directory -> (run it on an output path, how its messages name that path)."""
    from videotuna_dpo.pipeline.cache import cache_dataset
    from videotuna_dpo.pipeline.evaluate import evaluate
    from videotuna_dpo.pipeline.generate import generate_videos
    from videotuna_dpo.pipeline.pairs import build_pairs_dataset
    from videotuna_dpo.strategy import DPOStrategy

    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained, cfg.data.train_data = str(tmp_path / "model"), str(tmp_path / "ds")  # never read
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square moving right\n")
    return {
        "generate": (lambda out: generate_videos(cfg, NothingLoads(), prompts, out, num_samples=1), "--out {}"),
        "cache": (lambda out: cache_dataset(cfg, NothingLoads(), tmp_path / "ds", out), "--out {}"),
        "eval": (lambda out: evaluate(cfg, NothingLoads(), prompts, [], 1, out), "--out {}"),
        "pairs": (lambda out: build_pairs_dataset(tmp_path / "scores.jsonl", out), "--out {}"),
        "train": (lambda out: DPOStrategy.run(OmegaConf.merge(cfg, {"output_dir": str(out)}), NothingLoads()),
                  "output_dir={}"),
    }


@pytest.mark.parametrize("verb", ["generate", "cache", "eval", "pairs", "train"])
def test_a_file_where_an_output_directory_goes_is_named(tmp_path, verb):
    run, flag = _directory_verbs(tmp_path)[verb]
    out = tmp_path / "out"
    out.write_text("a file, not a directory\n")
    with pytest.raises(UserError) as info:
        run(out)
    assert str(info.value).startswith(f"{flag.format(out)}: {out} is a file, not a directory")


@pytest.mark.parametrize("verb", ["generate", "cache", "eval", "pairs", "train"])
def test_an_output_directory_without_write_permission_is_named(tmp_path, unwritable, verb):
    run, flag = _directory_verbs(tmp_path)[verb]
    out = unwritable / "out"
    with pytest.raises(UserError) as info:
        run(out)
    assert str(info.value).startswith(f"{flag.format(out)}: cannot write in {unwritable} (")
    assert not out.exists()


def test_score_output_that_is_a_directory_or_unwritable_is_named_before_scorers_load(tmp_path, unwritable):
    from videotuna_dpo.pipeline.score import score_videos

    for out, expected in [(tmp_path, f"--out {tmp_path}: {tmp_path} is a directory; give a file path"),
                          (unwritable / "scores.jsonl", f"--out {unwritable / 'scores.jsonl'}: cannot write in {unwritable} (")]:
        with pytest.raises(UserError) as info:
            score_videos(tmp_path / "no-videos-here", out, registry=NothingLoads())
        assert str(info.value).startswith(expected)
