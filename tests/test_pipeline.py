"""The preference-data loop from the CLI: generate -> score -> pairs -> cache -> train."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, make_backend
from videotuna_dpo.data.datamodule import PreferenceDataModule
from videotuna_dpo.data.latent_cache import CachedPreferenceDataset, build_cache
from videotuna_dpo.data.preference import load_pairs

CONFIG = ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"
PROMPTS = ["a red square moving left", "a blue circle moving up", "a green square moving down"]
NO_WEIGHTS = "temporal_flickering,dynamic_degree,motion_smoothness"


def cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "videotuna_dpo", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def loop(tiny_cogvideox, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    model = f"model.pretrained={tiny_cogvideox}"
    cli("generate", "--config", CONFIG, "--prompts", root / "prompts.txt", "--num-samples", 4, "--out", root / "samples", model)
    cli("score", "--videos", root / "samples", "--out", root / "scores.jsonl", "--scorers", NO_WEIGHTS, "--no-progress")
    pairs = cli("pairs", "--scores", root / "scores.jsonl", "--out", root / "ds", "--alpha", 1.0)
    cache = cli("cache", "--config", CONFIG, "--data", root / "ds", "--out", root / "cache", model)
    train = cli("train", "--strategy", "dpo", "--config", CONFIG, model, f"data.train_data={root / 'ds' / 'train_data.yaml'}",
                f"data.cache={root / 'cache'}", f"output_dir={root / 'run'}")
    return root, pairs, cache, train


def test_generate_writes_each_sample_with_its_record(loop):
    root = loop[0]
    records = sorted((root / "samples").glob("*_s*.json"))
    assert len(records) == 12
    rec = json.loads((root / "samples" / "p00001_s2.json").read_text())
    assert rec["prompt"] == PROMPTS[1] and rec["seed"] == 0 + 1 * 4 + 2
    assert rec["sampler"]["num_frames"] == 9 and rec["sampler"]["steps"] == 4
    assert rec["model"]["name"] == "cogvideox"
    from videotuna_dpo.data.video_io import read_video

    assert tuple(read_video(root / "samples" / "p00001_s2.mp4").shape) == (9, 3, 32, 32)


def test_pairs_are_best_vs_worst_with_official_layout_and_manifest(loop):
    root = loop[0]
    scores = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    by_prompt = {}
    for s in scores:
        by_prompt.setdefault(s["prompt"], []).append(s)
    meta = root / "ds" / "pairs"
    metadata = json.loads((meta / "metadata.json").read_text())
    pairs = json.loads((meta / "pair.json").read_text())
    manifest = json.loads((meta / "manifest.json").read_text())
    assert len(pairs) == 3
    for row, m in zip(pairs, manifest["pairs"]):
        group = by_prompt[row["frame_caption"]]
        winner = (meta / metadata[row["video1"]]["basic"]["clip_path"]).resolve()
        loser = (meta / metadata[row["video2"]]["basic"]["clip_path"]).resolve()
        assert str(winner) == max(group, key=lambda s: s["omniscore"])["path"]
        assert str(loser) == min(group, key=lambda s: s["omniscore"])["path"]
        assert m["weight"] == pytest.approx((0.72 / row["score"]) ** 1.0)
    assert manifest["reweighting"]["mode"] == "sqrt" and manifest["reweighting"]["alpha"] == 1.0
    assert len(manifest["videos"]) == 6 and "raw" in manifest["videos"][0]
    for name in ("omniscore_hist", "pair_gap_hist", "weight_hist", "dimension_correlation"):
        png = root / "ds" / "plots" / f"{name.replace('gap_hist', 'pair_gap_hist') if name == 'gap_hist' else name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "3 pairs from 3 prompts" in loop[1].stdout


def test_written_dataset_reads_back_with_identical_pairs_and_weights(loop):
    root = loop[0]
    manifest = json.loads((root / "ds" / "pairs" / "manifest.json").read_text())
    pairs = load_pairs(root / "ds" / "train_data.yaml")
    assert [p.weight for p in pairs] == pytest.approx([m["weight"] for m in manifest["pairs"]])
    videos = manifest["videos"]
    assert [(str(os.path.realpath(p.winner)), str(os.path.realpath(p.loser))) for p in pairs] == [
        (videos[m["winner"]]["path"], videos[m["loser"]]["path"]) for m in manifest["pairs"]]
    # The official formula on pair.json scores gives the same weights.
    official = load_pairs(root / "ds" / "train_data.yaml", weights="pair_score", alpha=1.0)
    assert [p.weight for p in official] == pytest.approx([p.weight for p in pairs])


def test_training_from_the_cache_runs_without_vae_or_text_encoder(loop, tiny_cogvideox):
    root = loop[0]
    index = json.loads((root / "cache" / "index.json").read_text())
    assert len(index["videos"]) == 6 and not index["skipped"]
    assert sorted(index["captions"]) == sorted(["", *PROMPTS])  # "" for caption dropout
    assert json.loads((root / "run" / "run.json").read_text())["global_step"] == 6
    cfg = OmegaConf.load(CONFIG)
    cfg.data.train_data = str(root / "ds" / "train_data.yaml")
    cfg.data.cache = str(root / "cache")
    dm = PreferenceDataModule.from_config(cfg.data)
    dm.setup()
    item = dm.dataset[0]
    assert item["winner_latents"].shape == (3, 4, 8, 8) and item["prompt_embeds"].shape == (16, 32)
    assert "winner" not in item  # no pixels: the VAE never runs
    backend = make_backend(tiny_cogvideox, load_text_and_vae=False)
    assert backend.vae is None and backend.text_encoder is None


def test_cached_latents_are_the_vae_posterior(loop, tiny_cogvideox):
    root = loop[0]
    backend = make_backend(tiny_cogvideox)
    pairs = load_pairs(root / "ds" / "train_data.yaml")
    from videotuna_dpo.data.latent_cache import _clip, video_id

    cfg = OmegaConf.load(CONFIG).data
    mean, std = backend.latent_distribution(_clip(pairs[0].winner, cfg)[None])
    index = json.loads((root / "cache" / "index.json").read_text())
    ds = CachedPreferenceDataset(root / "cache", index, pairs)
    entry = index["videos"][video_id(pairs[0].winner)]
    assert torch.allclose(ds._tensor(entry, "/mean"), mean[0], atol=2e-3)  # fp16 storage
    assert torch.allclose(ds._tensor(entry, "/std"), std[0], atol=2e-3)
    embeds = backend.encode_prompt([pairs[0].caption])[0]
    assert torch.allclose(ds._tensor(index["captions"][pairs[0].caption]), embeds, atol=2e-3)


def test_a_cache_built_for_another_setting_is_refused(loop, tiny_cogvideox):
    root = loop[0]
    proc = subprocess.run([sys.executable, "-m", "videotuna_dpo", "train", "--strategy", "dpo", "--config", str(CONFIG),
                           f"model.pretrained={tiny_cogvideox}", f"data.train_data={root / 'ds' / 'train_data.yaml'}",
                           f"data.cache={root / 'cache'}", "data.frame_stride=2", f"output_dir={root / 'r2'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "frame_stride: cache has 1, config has 2" in proc.stderr


def test_generate_resumes_after_a_kill_keeping_complete_videos(tiny_cogvideox, tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps({"red": PROMPTS[0], "blue": PROMPTS[1], "green": PROMPTS[2]}))
    out = tmp_path / "samples"
    args = [sys.executable, "-m", "videotuna_dpo", "generate", "--config", str(CONFIG), "--prompts",
            str(tmp_path / "prompts.json"), "--num-samples", "6", "--out", str(out), f"model.pretrained={tiny_cogvideox}",
            "generate.batch_size=1", "generate.steps=20"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(out.glob("*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.stem: p.stat().st_mtime_ns for p in out.glob("*_s*.json")}
    assert 3 <= len(done) < 18, "killed part-way"
    for mp4 in out.glob("*.mp4"):
        assert not mp4.name.startswith(".") or True
    finished = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"kept {len(done)} already complete" in finished.stdout
    assert len(list(out.glob("*_s*.json"))) == 18 and len(list(out.glob("[!.]*.mp4"))) == 18
    assert not list(out.glob(".*"))  # no temporary file survives
    for stem, mtime in done.items():
        assert (out / f"{stem}.json").stat().st_mtime_ns == mtime, "complete videos are not redone"


def test_cache_resumes_after_an_interruption(tiny_cogvideox, tmp_path, loop):
    root = loop[0]
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(tiny_cogvideox)
    backend = make_backend(tiny_cogvideox)
    calls = []
    original = backend.latent_distribution

    def interrupted(pixels):
        calls.append(pixels.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is stopped during its second batch
        return original(pixels)

    backend.latent_distribution = interrupted
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg.model, cfg.data, backend, root / "ds", out, shard_size=1, batch_size=2)
    index = json.loads((out / "index.json").read_text())
    assert len(index["videos"]) == 2 and len(index["shards"]) == 1  # the first batch's shard is kept
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors"]
    backend.latent_distribution = original
    calls.clear()
    summary = build_cache(cfg.model, cfg.data, backend, root / "ds", out, shard_size=1, batch_size=2)
    assert summary["kept"] == 2 and summary["encoded"] == 4
    assert len(json.loads((out / "index.json").read_text())["videos"]) == 6


@pytest.mark.parametrize("dies_in", ["save_file", "write_json_atomic"])
def test_cache_killed_while_writing_a_shard_or_the_index_resumes_to_the_uninterrupted_cache(
        tiny_cogvideox, tmp_path, loop, monkeypatch, dies_in):
    from videotuna_dpo.data import latent_cache

    root = loop[0]
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(tiny_cogvideox)
    backend = make_backend(tiny_cogvideox)
    build = lambda out: build_cache(cfg.model, cfg.data, backend, root / "ds", out, shard_size=1, batch_size=2)  # noqa: E731
    whole = tmp_path / "whole"
    build(whole)
    real, calls = getattr(latent_cache, dies_in), []

    def killed_on_the_second_call(*args):
        calls.append(args)
        if len(calls) == 2:
            if dies_in == "save_file":  # save_file(tensors, path): half the shard is on disk
                Path(args[1]).write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(latent_cache, dies_in, killed_on_the_second_call)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build(out)
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == ["shard-00000.safetensors"]
    assert {e["shard"] for kind in ("videos", "captions") for e in index[kind].values()} == {"shard-00000.safetensors"}
    # Killed between a shard and the index that would name it, the shard (whole, naming its entries) is taken up
    # by the resume, which encodes only what no shard holds.
    orphan = ["shard-00001.safetensors"] if dies_in == "write_json_atomic" else []
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-00000.safetensors", *orphan]
    monkeypatch.undo()
    summary = build(out)
    kept = 4 if orphan else 2
    assert summary["kept"] == kept and summary["encoded"] == 6 - kept and summary["shards"] == 3
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    assert files(out) == files(whole)  # byte-identical shards and index


def test_a_prompt_id_starting_with_a_dot_is_generated_once_and_scored_while_killed_writes_are_cleaned(
        tiny_cogvideox, tmp_path):
    from videotuna_dpo.pipeline.generate import generate_videos
    from videotuna_dpo.pipeline.score import list_videos

    (tmp_path / "prompts.json").write_text(json.dumps({".intro": PROMPTS[0], "main": PROMPTS[1]}))
    out = tmp_path / "samples"
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), {"model": {"pretrained": str(tiny_cogvideox)}, "generate": {"steps": 1}})
    backend = make_backend(tiny_cogvideox)
    generate = lambda: generate_videos(cfg, None, tmp_path / "prompts.json", out, num_samples=1, backend=backend)  # noqa: E731
    assert generate()["generated"] == 2
    # A writer killed inside atomic_file leaves its temporary file behind.
    killed = subprocess.run([sys.executable, "-c", "import os\nfrom videotuna_dpo.fileio import atomic_file\n"
                             f"with atomic_file({str(out / 'main_s0.mp4')!r}, suffix='.mp4') as tmp:\n"
                             "    open(tmp, 'w').write('half a video')\n    os._exit(9)\n"], cwd=ROOT)
    assert killed.returncode == 9
    [temporary] = [p for p in out.iterdir() if p.name.startswith(".main_s0.mp4")]
    intro = (out / ".intro_s0.mp4").stat().st_mtime_ns
    assert generate() == {"generated": 0, "kept": 2, "total": 2}
    assert not temporary.exists() and (out / ".intro_s0.mp4").stat().st_mtime_ns == intro
    assert [p.name for p in list_videos(out)] == [".intro_s0.mp4", "main_s0.mp4"]
