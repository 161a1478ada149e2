"""The bad-data corpus: each broken input gives a named error or an explicit, counted skip."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, make_backend
from tests.datasets import moving_square, write_official_dataset
from videotuna_dpo.data.datamodule import PreferenceDataModule, PreferenceVideoDataset
from videotuna_dpo.data.latent_cache import CachedPreferenceDataset, build_cache
from videotuna_dpo.data.preference import DataError, load_pairs
from videotuna_dpo.data.video_io import write_video
from videotuna_dpo.errors import UserError

CAPTIONS = ["a red square moving right", "a blue square moving right", "a green square moving right"]
CONFIG = ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text(path):
    path.write_text("hello, I am a text file\n")


def _empty(path):
    path.write_bytes(b"")


def _short(path):
    write_video(path, moving_square(frames=4), lossless=True)


UNREADABLE = {
    "zero_byte": (_empty, "empty file (0 bytes)"),
    "truncated": (_truncate, "cannot decode"),
    "text_renamed_mp4": (_text, "cannot decode"),
    "too_few_frames": (_short, "4 frames, but data.video_length=9 needs at least 9"),
}


@pytest.fixture()
def dataset(tmp_path):
    return write_official_dataset(tmp_path / "ds", CAPTIONS)


def _video(dataset, name):
    return dataset.parent / "part0" / "videos" / name


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_video_fails_its_training_pair_by_name(dataset, case):
    spoil, reason = UNREADABLE[case]
    bad = _video(dataset, "0_1_bad.mp4")
    spoil(bad)
    # Found when the dataset is built (every video's frame count is read then), before any training step.
    with pytest.raises(DataError) as info:
        PreferenceVideoDataset(load_pairs(dataset), video_length=9, frame_stride=1, resolution=(32, 32))
    [problem] = info.value.problems
    assert f"part0/pair.json row 1: {bad}" in problem and reason in problem


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_video_is_a_reported_skip_in_cache_removing_exactly_its_pairs(dataset, tiny_cogvideox, tmp_path, capsys, case):
    spoil, reason = UNREADABLE[case]
    bad = _video(dataset, "0_1_good.mp4")  # the winner of pair row 1
    spoil(bad)
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(tiny_cogvideox)
    summary = build_cache(cfg.model, cfg.data, make_backend(tiny_cogvideox), dataset, tmp_path / "cache")
    assert summary["skipped_now"] == 1 and summary["encoded"] == 5
    err = capsys.readouterr().err
    assert f"skipped {bad}: " in err and reason in err
    cfg.data.train_data, cfg.data.cache = str(dataset), str(tmp_path / "cache")
    dm = PreferenceDataModule.from_config(cfg.data)
    dm.setup("fit")
    assert isinstance(dm.dataset, CachedPreferenceDataset)
    assert [p.row for p in dm.pairs] == [0, 2]
    assert "1 pair(s) left out" in capsys.readouterr().err


def test_unreadable_videos_are_failure_lines_in_score_and_left_out_of_pairs(dataset, tmp_path):
    videos = dataset.parent / "part0" / "videos"
    for i in range(3):  # a third take per prompt, so every prompt keeps two readable videos
        write_video(videos / f"0_{i}_extra.mp4", moving_square(jitter=True, seed=10 + i), lossless=True)
    spoiled = {"zero_byte": "0_0_bad.mp4", "truncated": "0_1_bad.mp4", "text_renamed_mp4": "0_2_bad.mp4",
               "too_few_frames": "0_1_good.mp4"}
    for case, name in spoiled.items():
        UNREADABLE[case][0](videos / name)
    prompts = {f"0_{i}_{k}.mp4": CAPTIONS[i] for i in range(3) for k in ("good", "bad", "extra")}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    run = lambda *a: subprocess.run([sys.executable, "-m", "videotuna_dpo", *map(str, a)], capture_output=True, text=True)
    proc = run("score", "--videos", videos, "--prompts", tmp_path / "prompts.json", "--out", tmp_path / "s.jsonl",
               "--scorers", "temporal_flickering,motion_smoothness", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = {json.loads(l)["path"].rsplit("/", 1)[1]: json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()}
    failed = {k: v["reason"] for k, v in lines.items() if v["status"] == "failed"}
    # A 4-frame clip still scores (these scorers need 2 frames); the three undecodable files fail.
    assert set(failed) == {"0_0_bad.mp4", "0_1_bad.mp4", "0_2_bad.mp4"}
    assert failed["0_0_bad.mp4"] == "empty file (0 bytes)"
    assert all("omniscore" not in v for v in lines.values() if v["status"] == "failed"), "never scored as zeros"
    proc = run("pairs", "--scores", tmp_path / "s.jsonl", "--out", tmp_path / "pairs")
    assert proc.returncode == 0, proc.stderr
    assert "3 video(s) failed scoring and are left out" in proc.stderr
    manifest = json.loads((tmp_path / "pairs" / "pairs" / "manifest.json").read_text())
    assert {f["path"].rsplit("/", 1)[1] for f in manifest["failed_videos"]} == set(failed)
    used = {v["path"].rsplit("/", 1)[1] for v in manifest["videos"]}
    assert not used & set(failed)


def _edit(dataset, name, edit):
    path = dataset.parent / "part0" / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, edit, message",
    [
        ("missing_file", lambda d: _video(d, "0_2_good.mp4").unlink(),
         "part0/pair.json row 2: video file(s) not found: {root}/part0/videos/0_2_good.mp4"),
        ("index_out_of_range", lambda d: _edit(d, "pair.json", lambda p: p[0].update(video2=-1)),
         "part0/pair.json row 0: video2=-1 out of range (metadata.json has 6 entries)"),
        ("winner_is_loser", lambda d: _edit(d, "pair.json", lambda p: p[1].update(video1=3)),
         "part0/pair.json row 1: winner and loser are the same video (index 3)"),
        ("nan_score", lambda d: _edit(d, "pair.json", lambda p: p[2].update(score=float("nan"))),
         "part0/pair.json row 2: score nan is not a finite number"),
        ("inf_score", lambda d: _edit(d, "pair.json", lambda p: p[2].update(score=float("-inf"))),
         "part0/pair.json row 2: score -inf is not a finite number"),
        ("empty_caption", lambda d: _edit(d, "pair.json", lambda p: p[0].update(frame_caption=[""])),
         "part0/pair.json row 0: empty caption (frame_caption)"),
        ("malformed_metadata", lambda d: (d.parent / "part0" / "metadata.json").write_text("[{]"),
         "part0/metadata.json: malformed JSON"),
        ("malformed_train_data", lambda d: d.write_text("META: [part0\n"), "train_data.yaml: malformed YAML"),
        ("duplicate_video_ids", lambda d: _edit(d, "metadata.json", lambda m: m[3]["basic"].update(clip_path=m[1]["basic"]["clip_path"])),
         "part0/metadata.json row 3: duplicate video videos/0_0_bad.mp4 (also row 1)"),
        ("dir_listed_twice", lambda d: d.write_text("META: [part0, part0]\n"),
         "train_data.yaml: META[1] part0 is listed twice (also META[0])"),
        ("manifest_is_a_list", lambda d: (d.parent / "part0" / "manifest.json").write_text("[]"),
         "part0/manifest.json: expected a JSON object with a \"pairs\" list of objects, one per pair.json row "
         "(as `videotuna pairs` writes it), got a JSON list"),
        ("manifest_pairs_not_objects", lambda d: (d.parent / "part0" / "manifest.json").write_text('{"pairs": [1, 2, 3]}'),
         "part0/manifest.json: expected a JSON object with a \"pairs\" list of objects"),
        ("pair_row_repeated", lambda d: _edit(d, "pair.json", lambda p: p.append(dict(p[1]))),
         "part0/pair.json row 3: the same pair as {root}/part0/pair.json row 1 (winner, loser and caption); "
         "a pair listed twice trains twice"),
    ],
)
def test_malformed_dataset_is_an_error_naming_file_and_row(dataset, case, edit, message):
    edit(dataset)
    with pytest.raises(DataError) as info:
        load_pairs(dataset)
    assert message.format(root=dataset.parent) in str(info.value)


def test_mixed_resolution_videos_all_arrive_at_the_training_resolution(dataset, tiny_cogvideox, tmp_path):
    write_video(_video(dataset, "0_0_good.mp4"), moving_square(size=48), lossless=True)
    write_video(_video(dataset, "1_1_bad.mp4"), torch.zeros(9, 3, 40, 64, dtype=torch.uint8), lossless=True)
    ds = PreferenceVideoDataset(load_pairs(dataset), video_length=9, frame_stride=1, resolution=(32, 32))
    assert {tuple(ds[i][k].shape) for i in range(3) for k in ("winner", "loser")} == {(3, 9, 32, 32)}
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(tiny_cogvideox)
    summary = build_cache(cfg.model, cfg.data, make_backend(tiny_cogvideox), dataset, tmp_path / "cache")
    assert summary["encoded"] == 6 and summary["skipped_now"] == 0


def _cache(dataset, tiny_cogvideox, out, **kwargs):
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(tiny_cogvideox)
    summary = build_cache(cfg.model, cfg.data, make_backend(tiny_cogvideox), dataset, out, **kwargs)
    cfg.data.train_data, cfg.data.cache = str(dataset), str(out)
    return summary, cfg


def _open_cache(cfg):
    dm = PreferenceDataModule.from_config(cfg.data)
    dm.setup("fit")
    return dm.dataset


def test_a_corrupt_cache_shard_is_named_before_training_and_cache_encodes_it_again(dataset, tiny_cogvideox, tmp_path):
    out = tmp_path / "cache"
    _, cfg = _cache(dataset, tiny_cogvideox, out, shard_size=2, batch_size=2)
    shard = out / "shard-00001.safetensors"
    held = [k for k, e in json.loads((out / "index.json").read_text())["videos"].items() if e["shard"] == shard.name]
    data = shard.read_bytes()
    shard.write_bytes(b"\xff" * 8 + data[8:])  # the header length field now claims exabytes: "header too large"
    with pytest.raises(UserError) as info:
        _open_cache(cfg)
    message = str(info.value)
    assert f"shard {shard} is unreadable (Error while deserializing header: header too large)" in message
    assert "`videotuna cache` with the same --data and --out" in message
    summary, _ = _cache(dataset, tiny_cogvideox, out, shard_size=2, batch_size=2)
    assert summary["encoded"] == len(held) == 2 and summary["kept"] == 4
    cached = _open_cache(cfg)
    assert len(cached) == 3 and all(torch.isfinite(cached[i]["winner_latents"]).all() for i in range(3))


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "..", "sub/shard.safetensors"])
def test_cache_index_naming_a_shard_outside_the_cache_dir_is_refused(dataset, tiny_cogvideox, tmp_path, name):
    out = tmp_path / "cache"
    _, cfg = _cache(dataset, tiny_cogvideox, out)
    index = json.loads((out / "index.json").read_text())
    (tmp_path / "outside.safetensors").write_bytes((out / index["shards"][0]).read_bytes())  # a readable decoy
    index["shards"] = [name]
    for kind in ("videos", "captions"):
        for entry in index[kind].values():
            entry["shard"] = name
    (out / "index.json").write_text(json.dumps(index))
    expected = f"{out / 'index.json'}: shard name {name!r} is not a plain file name inside the cache directory"
    with pytest.raises(UserError, match="shard name") as info:
        _open_cache(cfg)
    assert expected in str(info.value)
    with pytest.raises(UserError) as info:
        _cache(dataset, tiny_cogvideox, out)
    assert expected in str(info.value)


def test_a_video_skipped_by_cache_is_tried_again_and_encoded_once_fixed(dataset, tiny_cogvideox, tmp_path, capsys):
    bad = _video(dataset, "0_1_good.mp4")
    original = bad.read_bytes()
    _empty(bad)
    out = tmp_path / "cache"
    summary, cfg = _cache(dataset, tiny_cogvideox, out)
    assert (summary["encoded"], summary["skipped_now"], summary["kept"]) == (5, 1, 0)
    again, _ = _cache(dataset, tiny_cogvideox, out)  # still broken: tried again, skipped again, never "kept"
    assert (again["encoded"], again["skipped_now"], again["kept"], again["skipped_total"]) == (0, 1, 5, 1)
    assert f"skipped {bad}: empty file (0 bytes)" in capsys.readouterr().err
    bad.write_bytes(original)
    fixed, _ = _cache(dataset, tiny_cogvideox, out)
    assert (fixed["encoded"], fixed["skipped_now"], fixed["kept"], fixed["skipped_total"]) == (1, 0, 5, 0)
    assert [p.row for p in _open_cache(cfg).pairs] == [0, 1, 2]
