"""`videotuna score` end to end: the JSONL it writes, failures, kill-and-resume, prompt sources."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, make_distribution
from videotuna_dpo.cli import parse_options
from videotuna_dpo.data.scores import ScoresFile, read_scores
from videotuna_dpo.data.video_io import read_video, write_video
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.prompts import load_prompts
from videotuna_dpo.scoring.omniscore import omniscore

FREE = "temporal_flickering,dynamic_degree,motion_smoothness,imaging_quality"

SLOW_SCORER = """
    import os, time
    import pluggy, torch
    hookimpl = pluggy.HookimplMarker("videotuna")

    class SlowScorer:
        kind = "quality"
        needs_weights = False
        weights_hint = ""
        version = "slow-1"

        def __call__(self, videos, prompts):
            with open(os.environ["SLOW_SCORER_LOG"], "a") as fh:
                fh.write("".join(p + "\\n" for p in prompts))
            time.sleep(0.6)
            return videos.float().mean(dim=(1, 2, 3, 4))

    @hookimpl
    def videotuna_scorers():
        return {"slow": SlowScorer}
"""

@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("scoring_site")
    make_distribution(site, "slow-test-scorer", {"slow_scorer": "slow_scorer_plugin"}, {"slow_scorer_plugin": SLOW_SCORER})
    return site


def moving_clip(offset: int, frames: int = 8, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    video = torch.zeros(frames, 3, size, size)
    for f in range(frames):
        disk = ((xx - 12 - offset - 3 * f) ** 2 + (yy - 32) ** 2 < 100).float()
        video[f] = 0.2 + 0.1 * torch.sin(xx / 5.0) + 0.6 * disk
    return video.clamp(0, 1)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    """clip0..clip4.mp4 (lossless), corrupt.mp4 (text), short.mp4 (one frame), prompts.json."""
    root = tmp_path_factory.mktemp("videos")
    for i in range(5):
        write_video(root / f"clip{i}.mp4", moving_clip(2 * i), lossless=True)
    (root / "corrupt.mp4").write_text("this is not an mp4 file\n")
    write_video(root / "short.mp4", moving_clip(0, frames=1), lossless=True)
    prompts = {f"clip{i}.mp4": f"a disk moving right, take {i}" for i in range(5)}
    prompts |= {"corrupt": "a broken file", "short.mp4": "a single frame"}
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def score_cmd(video_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "videotuna_dpo", "score", "--videos", str(video_dir),
            "--prompts", str(video_dir / "prompts.json"), "--out", str(out), "--no-progress", *extra]


def env_with(site: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("VIDEOTUNA_WEIGHTS", None)
    env.update(extra)
    return env


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_writes_a_record_per_video_and_failure_lines(video_dir, plugin_site, tmp_path):
    out = tmp_path / "scores.jsonl"
    proc = subprocess.run(score_cmd(video_dir, out, "--scorers", FREE, "--batch-size", "2"),
                          capture_output=True, text=True, env=env_with(plugin_site))
    assert proc.returncode == 0, proc.stderr
    assert "scored 5, failed 2, skipped 0" in proc.stdout
    # Before scoring, each dimension's backend and weights are named.
    assert "  dynamic_degree: vbench-dynamic_degree-2/opencv-dis-medium [no weights]" in proc.stderr
    assert "  imaging_quality: imaging_quality-niqe-proxy-1 [niqe_params=" in proc.stderr
    records = {Path(r["path"]).name: r for r in lines_of(out)}
    assert sorted(records) == ["clip0.mp4", "clip1.mp4", "clip2.mp4", "clip3.mp4", "clip4.mp4", "corrupt.mp4", "short.mp4"]
    assert records["corrupt.mp4"]["status"] == "failed" and "cannot decode" in records["corrupt.mp4"]["reason"]
    assert records["short.mp4"]["status"] == "failed"
    assert records["short.mp4"]["reason"].startswith("too short: 1 frame(s)")
    assert "raw" not in records["corrupt.mp4"] and "omniscore" not in records["short.mp4"]
    clip = records["clip3.mp4"]
    assert clip["status"] == "ok" and clip["prompt"] == "a disk moving right, take 3"
    assert sorted(clip["raw"]) == sorted(FREE.split(","))
    # The raw flickering value is VBench's formula on the decoded frames.
    frames = read_video(video_dir / "clip3.mp4").double()
    mae = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3)).mean().item()
    assert clip["raw"]["temporal_flickering"] == pytest.approx((255 - mae) / 255, abs=1e-6)
    agg = omniscore(clip["raw"])
    assert clip["omniscore"] == pytest.approx(agg["omniscore"]) and clip["quality"] == pytest.approx(agg["quality"])
    assert clip["semantic"] is None and clip["dimensions_used"] == agg["dimensions_used"]
    assert clip["scorers"]["dynamic_degree"]["version"].endswith("opencv-dis-medium")
    assert clip["scorers"]["imaging_quality"]["version"] == "imaging_quality-niqe-proxy-1"
    assert (clip["frames"], clip["height"], clip["width"]) == (8, 64, 64)

    before = out.read_bytes()
    again = subprocess.run(score_cmd(video_dir, out, "--scorers", FREE), capture_output=True, text=True,
                           env=env_with(plugin_site))
    assert again.returncode == 0, again.stderr
    assert "scored 0, failed 0, skipped 7" in again.stdout
    assert out.read_bytes() == before


def test_killed_run_resumes_without_rescoring(video_dir, plugin_site, tmp_path):
    out = tmp_path / "scores.jsonl"
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    cmd = score_cmd(video_dir, out, "--scorers", "temporal_flickering,slow", "--batch-size", "1")
    proc = subprocess.Popen(cmd, env=env_with(plugin_site, SLOW_SCORER_LOG=str(first_log)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = tmp_path / "scores.jsonl.parts" / "rank-0.jsonl"  # lines go here until the job ends and merges them
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if part.exists() and part.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    written = lines_of(part)
    assert 1 <= len(written) < 7
    # What a kill in the middle of a write would leave behind.
    with open(part, "ab") as fh:
        fh.write(b'{"path": "/videos/clip9.mp4", "status": "o')

    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_with(plugin_site, SLOW_SCORER_LOG=str(second_log)))
    assert proc.returncode == 0, proc.stderr
    assert "dropped a partial last line" in proc.stderr
    assert f"skipped {len(written)}" in proc.stdout
    final = lines_of(out)  # every line parses: the partial one is gone
    assert final[: len(written)] == written
    names = [Path(r["path"]).name for r in final]
    assert sorted(names) == sorted(set(names)) and len(names) == 7
    rescored = set(second_log.read_text().splitlines())
    assert rescored.isdisjoint({r["prompt"] for r in written})
    assert {r["status"] for r in final if Path(r["path"]).stem in ("corrupt", "short")} == {"failed"}


def test_changed_scorer_settings_do_not_mix_into_an_existing_file(video_dir, plugin_site, tmp_path):
    out = tmp_path / "scores.jsonl"
    record = {"path": "/elsewhere/x.mp4", "prompt": "p", "status": "ok", "raw": {"dynamic_degree": 1.0},
              "scorers": {"dynamic_degree": {"version": "vbench-dynamic_degree-1/opencv-farneback", "weights": None}}}
    out.write_text(json.dumps(record) + "\n")
    proc = subprocess.run(score_cmd(video_dir, out, "--scorers", "dynamic_degree"), capture_output=True, text=True,
                          env=env_with(plugin_site))
    assert proc.returncode == 2
    assert "do not mix" in proc.stderr and "opencv-farneback" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_weights_are_reported_together_before_any_scoring(video_dir, plugin_site, tmp_path):
    out = tmp_path / "scores.jsonl"
    proc = subprocess.run(score_cmd(video_dir, out), capture_output=True, text=True, env=env_with(plugin_site))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for name in ("subject_consistency", "aesthetic_quality", "overall_consistency"):
        assert f"{name}:" in proc.stderr
    assert "VIDEOTUNA_WEIGHTS" in proc.stderr and f"--scorers {FREE}" in proc.stderr
    assert not out.exists()


def test_score_help_has_an_example():
    proc = subprocess.run([sys.executable, "-m", "videotuna_dpo", "score", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert "example: videotuna score --videos" in proc.stdout


def test_prompts_from_sidecars_txt_and_json_lists(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "sub" / "b.mp4"
    for v in (a, b):
        v.parent.mkdir(exist_ok=True)
        v.write_bytes(b"")
    (tmp_path / "a.mp4.json").write_text(json.dumps({"prompt": "from sidecar", "seed": 7, "model": "tiny"}))
    (tmp_path / "sub" / "b.json").write_text(json.dumps({"prompt": "from stem sidecar"}))
    got = load_prompts([a, b])
    assert got[a] == ("from sidecar", {"seed": 7, "model": "tiny"})
    assert got[b] == ("from stem sidecar", {})
    txt = tmp_path / "prompts.txt"
    txt.write_text("first\n\nsecond\n")
    assert [p for p, _ in load_prompts([a, b], txt).values()] == ["first", "second"]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([{"path": "sub/b.mp4", "prompt": "by relative path"}]))
    assert load_prompts([a, b], listed)[b] == ("by relative path", {})
    txt.write_text("only one\n")
    with pytest.raises(UserError, match="1 prompt lines for 2 videos"):
        load_prompts([a, b], txt)
    (tmp_path / "a.mp4.json").unlink()
    with pytest.raises(UserError, match=r"no prompt for 1 video\(s\): .*a\.mp4"):
        load_prompts([a, b])


def test_scores_file_recovery_and_reading(tmp_path):
    path = tmp_path / "s.jsonl"
    store = ScoresFile(path)
    store.append({"path": "/v/a.mp4", "status": "ok", "omniscore": 0.5})
    store.append({"path": "/v/b.mp4", "status": "failed", "reason": "cannot decode"})
    with open(path, "ab") as fh:
        fh.write(b'{"path": "/v/c.mp4"')
    assert list(read_scores(path)) == ["/v/a.mp4", "/v/b.mp4"]  # reading leaves the partial line alone
    assert path.read_bytes().endswith(b'"/v/c.mp4"')
    assert [r["path"] for r in ScoresFile(path).recover()] == ["/v/a.mp4", "/v/b.mp4"]
    assert path.read_bytes().endswith(b"\n")
    path.write_text('{"path": "/v/a.mp4", "status": "ok"}\nnot json\n{"path": "/v/b.mp4", "status": "ok"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: not a JSON record"):
        ScoresFile(path).recover()
    assert parse_options(["dynamic_degree.fps=16", "aesthetic_quality.clip_weights=/w/c.pt"]) == {
        "dynamic_degree": {"fps": 16}, "aesthetic_quality": {"clip_weights": "/w/c.pt"}}
    with pytest.raises(UserError, match="SCORER.KEY=VALUE"):
        parse_options(["fps=16"])


def test_reading_scores_says_which_partial_last_line_it_leaves_out(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    store = ScoresFile(path)
    store.append({"path": "/v/a.mp4", "status": "ok", "omniscore": 0.5})
    store.append({"path": "/v/b.mp4", "status": "ok", "omniscore": 0.4})
    with open(path, "ab") as fh:
        fh.write(b'{"path": "/v/c.mp4"')
    assert list(read_scores(path)) == ["/v/a.mp4", "/v/b.mp4"]
    assert capsys.readouterr().err == (
        f"{path}:3: ignored a partial last line (19 bytes), left by an interrupted `videotuna score` or a file cut "
        f"short; rerun `videotuna score` with this --out to finish it\n")
    with open(path, "ab") as fh:  # a last record that lacks only its newline (a hand-edited file) is complete
        fh.write(b', "status": "ok", "omniscore": 0.3}')
    assert list(read_scores(path)) == ["/v/a.mp4", "/v/b.mp4", "/v/c.mp4"]
    assert capsys.readouterr().err == ""


def test_a_video_listed_several_times_is_scored_once(video_dir, tmp_path, capsys):
    from videotuna_dpo.pipeline.score import score_videos

    listing = tmp_path / "videos.txt"
    clip0 = video_dir / "clip0.mp4"
    listing.write_text(f"{clip0}\n{video_dir / 'clip1.mp4'}\n{clip0}\n{os.path.relpath(clip0, tmp_path)}\n")  # relative: same file
    out = tmp_path / "scores.jsonl"
    summary = score_videos(listing, out, prompts=video_dir / "prompts.json", scorers=["temporal_flickering"],
                           progress=False)
    assert summary["scored"] == 2
    assert [Path(r["path"]).name for r in lines_of(out)] == ["clip0.mp4", "clip1.mp4"]
    assert (f"--videos: 2 repeated path(s) dropped, each video is scored once (first: {clip0})"
            in capsys.readouterr().err)
