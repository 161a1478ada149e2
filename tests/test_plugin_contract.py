"""A third-party distribution written from hookspecs.py alone runs through every verb of the CLI.

``tests/plugin_from_spec`` is that distribution (``acme-videotuna``): a strategy whose ``run`` takes no
``source``, a datamodule and a backend whose ``from_config`` take no ``source``, a backend that is a plain
``nn.Module`` without ``latent_distribution``, and a scorer with a ``score_range``. It is pip-installed into a
private directory and driven through ``videotuna`` subprocesses, as a user would.
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.registry import call_with_optional

CONFIG = """\
output_dir: {run}
seed: 0
model: {{name: acme_pixels, init_std: 0.1}}
data: {{name: acme_toggle, pairs: 4, frames: 2, size: 8, batch_size: 2}}
dpo: {{beta: 100.0}}
optimizer: {{lr: 1.0e-3}}
lightning:
  trainer: {{max_steps: 2, accelerator: cpu, enable_progress_bar: false, enable_model_summary: false}}
generate: {{num_frames: 2, steps: 2, guidance: 1.0, height: 16, width: 16, fps: 8, lossless: true}}
"""


@pytest.fixture(scope="module")
def acme_site(tmp_path_factory) -> Path:
    """tests/plugin_from_spec installed by pip into a private site directory (built from a copy: no build/ left)."""
    source = tmp_path_factory.mktemp("acme_source") / "acme"
    shutil.copytree(ROOT / "tests" / "plugin_from_spec", source)
    target = tmp_path_factory.mktemp("acme_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return target


def _videotuna(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "videotuna_dpo", *args], capture_output=True, text=True, env=env)


def test_a_plugin_written_from_the_spec_runs_through_the_cli(acme_site, tmp_path, monkeypatch):
    # plugins: every kind listed with its distribution, none of its modules imported to list them.
    proc = _videotuna(acme_site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    acme = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout) if r["distribution"] == "acme-videotuna"}
    assert sorted(acme) == [("datamodule", "acme_toggle"), ("model", "acme_pixels"), ("scorer", "acme_redness"),
                            ("strategy", "acme_count")]
    assert {(r["plugin"], r["version"]) for r in acme.values()} == {("acme", "2.0.0")}

    config = tmp_path / "acme.yaml"
    config.write_text(CONFIG.format(run=tmp_path / "run"))

    # train --strategy dpo: the built-in strategy trains their backend on their datamodule.
    proc = _videotuna(acme_site, "train", "--strategy", "dpo", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv"))
            if r.get("train/loss")]
    assert len(rows) == 2
    assert float(rows[0]["train/loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    weights = tmp_path / "run" / "weights" / "last"
    assert json.loads((weights / "trainable.json").read_text()) == {"family": "acme_pixels"}
    trained = load_file(str(weights / "acme.safetensors"))
    torch.manual_seed(0)
    initial = torch.empty(3, 3, 1, 1, 1).normal_(0.0, 0.1)
    assert trained["weight"].shape == initial.shape and not torch.equal(trained["weight"], initial)

    # train --strategy acme_count: their strategy, called without `source`, gets the registry and the config.
    proc = _videotuna(acme_site, "train", "--strategy", "acme_count", "--config", str(config),
                      f"output_dir={tmp_path / 'count'}")
    assert proc.returncode == 0, proc.stderr
    assert f"run finished: {tmp_path / 'count'}" in proc.stdout
    count = json.loads((tmp_path / "count" / "count.json").read_text())
    assert count["pairs"] == 4 and count["parameters"] == 3 * 3 + 3 and count["resume"] is None
    assert "acme_redness" in count["scorers"] and "temporal_flickering" in count["scorers"]

    # generate with the tuned weights: one seed per video, the same video as their generate gives for it.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    proc = _videotuna(acme_site, "generate", "--config", str(config), "--prompts", str(prompts), "--num-samples", "2",
                      "--out", str(tmp_path / "samples"), "--seed", "7", "--weights", str(weights))
    assert proc.returncode == 0, proc.stderr
    monkeypatch.syspath_prepend(str(acme_site))
    from acme_videotuna.backend import PixelBackend

    backend = PixelBackend(0.1, trainable_weights=str(weights))
    expected = backend.generate(["a red ball"] * 2, num_frames=2, steps=2, guidance=1.0, seed=[7, 8], height=16,
                                width=16)
    videos = [read_video(tmp_path / "samples" / f"p00000_s{k}.mp4") for k in range(2)]
    for video, frames in zip(videos, expected):
        assert video.shape == (2, 3, 16, 16)
        assert (video.float() - frames.mul(255).round()).abs().max() <= 1

    # score with their scorer alone: its raw value recorded, and it is the OmniScore's only dimension.
    scores = tmp_path / "scores.jsonl"
    proc = _videotuna(acme_site, "score", "--videos", str(tmp_path / "samples"), "--scorers", "acme_redness",
                      "--out", str(scores), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    records = sorted((json.loads(line) for line in scores.read_text().splitlines()), key=lambda r: r["path"])
    assert [r["status"] for r in records] == ["ok", "ok"]
    from acme_videotuna.scorer import Redness

    for record, video in zip(records, videos):
        raw = float(Redness()(video[None].float() / 255, ["a red ball"])[0])
        assert record["raw"]["acme_redness"] == pytest.approx(raw, abs=1e-6)
        assert record["omniscore"] == pytest.approx((raw + 1) / 2, abs=1e-6)
        assert record["scorers"]["acme_redness"] == {"version": "acme-redness-1", "weights": None}


def test_optional_arguments_reach_only_callables_that_name_them():
    def positional(cfg):
        return (cfg,)

    def named(cfg, source="<config>"):
        return (cfg, source)

    def anything(cfg, **kwargs):
        return (cfg, kwargs)

    assert call_with_optional(positional, "c", source="s.yaml") == ("c",)
    assert call_with_optional(named, "c", source="s.yaml") == ("c", "s.yaml")
    assert call_with_optional(anything, "c", source="s.yaml") == ("c", {"source": "s.yaml"})


def test_cache_refuses_a_backend_without_latent_distribution_before_loading_it(acme_site, tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from videotuna_dpo.errors import UserError
    from videotuna_dpo.pipeline.cache import cache_dataset
    from videotuna_dpo.registry import Registry

    monkeypatch.syspath_prepend(str(acme_site))
    cfg = OmegaConf.create({"model": {"name": "acme_pixels"}})
    with pytest.raises(UserError, match="acme.yaml: model acme_pixels has no latent_distribution"):
        cache_dataset(cfg, Registry.load(), tmp_path / "ds", tmp_path / "cache", source="acme.yaml")
