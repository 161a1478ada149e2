"""generate / score / cache on two processes (DDP, gloo, CPU): the same bytes as one process, and resumable on
another number of processes after a kill."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, ddp_env

CONFIG = ROOT / "videotuna_dpo" / "toy" / "demo.yaml"
PROMPTS = ["a red square moving right", "a blue circle moving up", "a green square moving down"]
SCORERS = "temporal_flickering,dynamic_degree,motion_smoothness"
TOY = ["output_dir=unused", "generate.batch_size=2", "generate.steps=12"]
LIMIT = 240  # seconds a DDP command may take before the test fails (a rank that hangs must not hang the suite)


def videotuna(tmp: Path, name: str, *args, devices: int = 1, wait: bool = True):
    """Run the CLI (``--devices N`` on CPU for N > 1), its output in ``tmp/name.log``, shown when it fails."""
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "videotuna_dpo", *map(str, args)]
    if devices > 1:
        cmd[4:4] = ["--devices", str(devices), "--accelerator", "cpu"]
    # One thread per process, on one process or two: on a CPU the thread count changes the floats' reductions.
    env = ddp_env(VIDEOTUNA_DIST_TIMEOUT="60", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    if not wait:
        return proc
    try:
        code = proc.wait(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"{name} ran past {LIMIT} s:\n{log.read_text()[-4000:]}")
    assert code == 0, f"{name} exited {code}:\n{log.read_text()[-4000:]}"
    return log.read_text()


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: generate (3 prompts x 3 samples), score and pairs on one process."""
    tmp = tmp_path_factory.mktemp("one")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    videotuna(tmp, "generate", "generate", "--config", CONFIG, "--prompts", "prompts.txt", "--num-samples", 3,
              "--out", "samples", *TOY)
    videotuna(tmp, "score", "score", "--videos", "samples", "--out", "scores.jsonl", "--scorers", SCORERS,
              "--batch-size", 2, "--no-progress")
    from videotuna_dpo.pipeline.pairs import build_pairs_dataset

    build_pairs_dataset(tmp / "scores.jsonl", tmp / "ds")
    return tmp


def test_two_processes_generate_the_same_files_as_one(one_process, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = videotuna(tmp_path, "generate2", "generate", "--config", CONFIG, "--prompts", "prompts.txt",
                    "--num-samples", 3, "--out", "samples", *TOY, devices=2)
    assert digests(tmp_path / "samples") == digests(one_process / "samples")
    assert len(digests(tmp_path / "samples")) == 9 * 2 + 1  # mp4 + record per video, prompts.json
    assert out.count("generated 9, kept 0") == 1  # said once, by rank 0


def test_two_processes_score_the_same_scores_file_as_one(one_process, tmp_path):
    videos = one_process / "samples"
    videotuna(tmp_path, "score2", "score", "--videos", videos, "--out", "scores.jsonl", "--scorers", SCORERS,
              "--batch-size", 2, "--no-progress", devices=2)
    assert (tmp_path / "scores.jsonl").read_bytes() == (one_process / "scores.jsonl").read_bytes()
    paths = [json.loads(line)["path"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert paths == sorted(str(p) for p in videos.glob("*.mp4"))  # one line per video, in the videos' order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["score2.log", "scores.jsonl"]  # the parts are merged away


def test_two_processes_cache_the_same_shards_and_index_as_one(one_process, tmp_path):
    args = ["--config", CONFIG, "--data", one_process / "ds", "--shard-size", 2, "output_dir=unused",
            "data.batch_size=2", "--num-workers", 1]
    videotuna(tmp_path, "cache1", "cache", *args[:4], "--out", "one", *args[4:])
    videotuna(tmp_path, "cache2", "cache", *args[:4], "--out", "two", *args[4:], devices=2)
    one, two = digests(tmp_path / "one"), digests(tmp_path / "two")
    assert one == two
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    assert len(index["videos"]) == 6 and len(index["shards"]) == len(one) - 1 == 3  # 3 pairs, 2 videos a shard


def test_scores_of_a_killed_three_process_run_merge_on_two_into_the_one_process_file(one_process, tmp_path):
    """The parts a killed 3-rank run left (one with a half-written line) are kept, the rest scored, all merged."""
    reference = (one_process / "scores.jsonl").read_bytes().splitlines(keepends=True)
    parts = tmp_path / "scores.jsonl.parts"
    parts.mkdir()
    (parts / "rank-0.jsonl").write_bytes(reference[0] + reference[1])
    (parts / "rank-2.jsonl").write_bytes(reference[4] + reference[5][:40])  # killed while appending
    out = videotuna(tmp_path, "score2", "score", "--videos", one_process / "samples", "--out", "scores.jsonl",
                    "--scorers", SCORERS, "--batch-size", 2, "--no-progress", devices=2)
    assert "scored 6, failed 0, skipped 3" in out  # videos 0, 1, 4 kept (5 scored again, with 4: one batch)
    assert (tmp_path / "scores.jsonl").read_bytes() == b"".join(reference)
    assert not parts.exists()


def test_generate_killed_on_two_processes_finishes_on_one_without_redoing_or_duplicating(one_process, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["generate", "--config", CONFIG, "--prompts", "prompts.txt", "--num-samples", 3, "--out", "samples", *TOY]
    samples = tmp_path / "samples"
    proc = videotuna(tmp_path, "killed", *args, devices=2, wait=False)
    deadline = time.time() + LIMIT
    while len(list(samples.glob("*_s*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank, at once
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in samples.glob("*_s*.json")}
    assert 2 <= len(before) < 9, f"killed part-way:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    out = videotuna(tmp_path, "rerun", *args)
    assert f"generated {9 - len(before)}, kept {len(before)}" in out
    assert {p.name: p.stat().st_mtime_ns for p in samples.glob("*_s*.json") if p.name in before} == before
    assert digests(samples) == digests(one_process / "samples")  # no duplicate, no temporary, the same bytes
