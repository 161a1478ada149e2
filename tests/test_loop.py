"""`videotuna loop`: rounds of the public verbs, resumable with nothing redone, and its report.

The toy world at tiny sizes (8 captions, 2 held out; 2 samples per prompt; 4 sampler steps; 4 DPO steps):
one uninterrupted loop, and one killed twice (mid-training in round 1, after round 2's pairs) and rerun,
which must leave every finished step's files untouched and end with the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from videotuna_dpo.cli import main
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.demo import DEMO_CONFIG
from videotuna_dpo.pipeline.loop import promote_weights, run_loop, split_prompts
from videotuna_dpo.toy.world import all_specs

CAPTIONS = [s.caption for s in all_specs() if s.color in ("red", "blue") and s.direction in ("left", "up")]
TINY = ["generate.steps=4", "lightning.trainer.max_steps=4", "lightning.checkpoint.every_n_train_steps=2",
        "lightning.trainer.log_every_n_steps=1", "lightning.trainer.enable_progress_bar=false", "data.batch_size=2",
        "loop.samples=2", "loop.eval_samples=2", "loop.holdout_fraction=0.25",
        "eval.scorers=[temporal_flickering,dynamic_degree,motion_smoothness]", "eval.judges=[toy_alignment]"]
# Files a rerun rewrites by design: the loop's state and report, and eval's report of every round so far.
REWRITTEN = ("loop_state.json", "report/", "eval/report.json", "eval/report.html", "eval/plots/", "eval/grids/")


def _prompts(root: Path) -> Path:
    path = root / "prompts.json"
    path.write_text(json.dumps({f"c{i}": c for i, c in enumerate(CAPTIONS)}))
    return path


def _loop(root: Path, run=main, rounds: int = 2, extra=()):
    return run_loop(DEMO_CONFIG, _prompts(root), root / "out", rounds=rounds, overrides=[*TINY, *extra], run=run,
                    progress=lambda line: None)


def _snapshot(out: Path, leave_out: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Every file under ``out`` but the rewritten ones: (mtime in ns, sha256)."""
    found = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out).as_posix()
        if rel.startswith(REWRITTEN + leave_out):
            continue
        found[rel] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_a")
    return root, _loop(root)


class Killed(BaseException):
    """What a kill looks like to the loop: not an error it handles."""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A loop killed in round 1's training (after its step-2 checkpoint) and after round 2's pairs, rerun twice."""
    root = tmp_path_factory.mktemp("loop_b")
    out = root / "out"
    calls: list[list[str]] = []

    def kill_mid_training(argv):
        calls.append(argv)
        if argv[0] == "train":  # train 2 of the 4 steps, then die before the run is finished
            code = main([*argv, "lightning.trainer.max_steps=2"])
            (out / "round_1" / "run" / "run.json").unlink()
            raise Killed
        return main(argv)

    with pytest.raises(Killed):
        _loop(root, kill_mid_training)
    snapshots = [_snapshot(out, ("round_1/run/",))]

    def kill_after_round_2_pairs(argv):
        calls.append(argv)
        if argv[0] == "cache" and "round_2" in argv[argv.index("--out") + 1]:
            raise Killed
        return main(argv)

    with pytest.raises(Killed):
        _loop(root, kill_after_round_2_pairs)
    snapshots.append(_snapshot(out))

    def record(argv):
        calls.append(argv)
        return main(argv)

    summary = _loop(root, record)
    return root, summary, snapshots, calls


def test_each_round_runs_every_verb_from_the_previous_rounds_weights(uninterrupted):
    root, summary = uninterrupted
    out = root / "out"
    assert summary["rounds_done"] == 2 and summary["stopped_after"] is None
    state = json.loads((out / "loop_state.json").read_text())
    steps = ["generate", "score", "pairs", "cache", "train", "weights", "eval", "compare"]
    assert list(state["done"]) == [f"round_{r}/{s}" for r in (1, 2) for s in steps]
    # Round 1 samples the base, round 2 round 1's weights; training starts from them (reference: base).
    r1 = json.loads((out / "round_1" / "samples" / "c0_s0.json").read_text())
    r2 = json.loads((out / "round_2" / "samples" / "c0_s0.json").read_text())
    assert r1["model"]["weights"] is None
    assert r2["model"]["weights"] == str(out / "round_1" / "weights" / "last")
    assert (r1["seed"], r2["seed"]) == (0, 12)  # round 2 draws new seeds: 6 training prompts x 2 samples later
    cfg2 = OmegaConf.load(out / "round_2" / "run" / "config.yaml")
    assert cfg2.model.trainable_weights == str(out / "round_1" / "weights" / "last")
    assert cfg2.model.get("init_weights") is None
    assert "trainable_weights" not in OmegaConf.load(out / "round_1" / "run" / "config.yaml").model
    assert "loop" not in OmegaConf.load(out / "config.yaml")  # the verbs never see the loop: block
    for r in (1, 2):
        assert json.loads((out / f"round_{r}" / "run" / "run.json").read_text())["global_step"] == 4
        assert len(list((out / f"round_{r}" / "samples").glob("*.mp4"))) == 12
        manifest = json.loads((out / f"round_{r}" / "pairs" / "pairs" / "manifest.json").read_text())
        assert len(manifest["pairs"]) == summary["rounds"][r - 1]["pairs"] <= 6


def test_evaluation_never_uses_a_training_prompt(uninterrupted):
    root, _ = uninterrupted
    out = root / "out"
    train = json.loads((out / "prompts" / "train.json").read_text())
    held = json.loads((out / "prompts" / "heldout.json").read_text())
    assert len(held) == 2 and len(train) == 6 and not set(held.values()) & set(train.values())
    assert sorted([*held.values(), *train.values()]) == sorted(CAPTIONS)
    for label in ("base", "round_1", "round_2"):
        prompts = {json.loads(p.read_text())["prompt"] for p in (out / "eval" / "samples" / label).glob("*_s*.json")}
        assert prompts == set(held.values())
    again = split_prompts(list(reversed([(f"x{i}", c) for i, c in enumerate(CAPTIONS)])), 0.25)[1]
    assert set(again.values()) == set(held.values())  # by text: the order and ids of the file do not matter


def test_split_prompts_holds_out_by_text_and_keeps_every_entry_of_a_held_out_text_out():
    entries = [("a0", "x"), ("a1", "x"), ("b", "y"), ("c", "z"), ("d", "w")]
    train, held = split_prompts(entries, 0.5)
    assert len(held) == 2 and not set(held.values()) & set(train.values())
    assert sum(1 for _, t in entries if t in held.values()) + len(train) == 5
    assert split_prompts(entries, 0.0) == (dict(entries), {"a0": "x", "b": "y", "c": "z", "d": "w"})
    assert len(split_prompts(entries, 0.99)[0]) >= 1  # at least one training prompt is left
    with pytest.raises(UserError, match="needs at least 2"):
        split_prompts([("a", "x"), ("b", "x")], 0.5)


def test_the_report_shows_every_round_against_the_base_and_the_previous_round(uninterrupted):
    root, summary = uninterrupted
    report = json.loads((root / "out" / "report" / "loop.json").read_text())
    eval_report = json.loads((root / "out" / "eval" / "report.json").read_text())
    for r in (1, 2):
        rec = report["rounds"][r - 1]
        expected = {"base"} | ({f"round_{r - 1}"} if r > 1 else set())
        assert set(rec["against"]) == expected
        # Against the base: eval's own table, row for row.
        assert rec["against"]["base"]["rows"] == eval_report["tables"][f"round_{r}"]["rows"]
    omni = report["per_round"]["omniscore"]
    rows = [next(x for x in rec["against"]["base"]["rows"] if x["dimension"] == "omniscore")
            for rec in report["rounds"]]
    assert omni == [rows[0]["base"], rows[0]["tuned"], rows[1]["tuned"]]
    # Round 2 vs round 1: the same videos, paired by prompt and seed.
    prev = next(x for x in report["rounds"][1]["against"]["round_1"]["rows"] if x["dimension"] == "omniscore")
    assert prev["base"] == pytest.approx(rows[0]["tuned"]) and prev["tuned"] == pytest.approx(rows[1]["tuned"])
    assert prev["n"] == 4
    # The judge and the motion measures are there, apart from the training scorers.
    assert {"raw/toy_alignment", "raw/dynamic_degree", "raw/motion_magnitude"} <= set(report["per_round"])
    assert "normalized/toy_alignment" not in report["per_round"]  # a judge never joins the OmniScore
    html = (root / "out" / "report" / "loop.html").read_text()
    assert "Judges (never used in training)" in html and "Motion (not in the OmniScore)" in html
    for png in ("omniscore", "dimensions", "win_rates"):
        assert (root / "out" / "report" / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert report["rounds"][0]["train"]["global_step"] == 4 and "train/implicit_acc" in report["rounds"][0]["train"]
    assert report["summary_line"].startswith("loop: 2 round(s); held-out OmniScore base")


def test_a_killed_loop_reruns_from_where_it_stopped_with_nothing_redone(interrupted, uninterrupted):
    root, summary, snapshots, calls = interrupted
    out = root / "out"
    # What was finished when each kill came is byte- and mtime-identical after the reruns.
    final = _snapshot(out)
    for snapshot in snapshots:
        assert snapshot, "the snapshot holds files"
        changed = [rel for rel, stamp in snapshot.items() if final.get(rel) != stamp]
        assert changed == []
    verbs = [argv[0] for argv in calls]
    # Run 1: round 1 up to train (killed). Run 2: train resumed, then on to round 2's cache (killed).
    # Run 3: round 2 from cache. No verb ran twice for the same round but the killed ones.
    assert verbs == ["generate", "score", "pairs", "cache", "train",
                     "train", "eval", "generate", "score", "pairs", "cache",
                     "cache", "train", "eval"]
    resumed = calls[5]
    assert resumed[resumed.index("--resume") + 1] == "last"
    # The same numbers as the loop that ran through (training resumes exactly; sampling is seeded).
    _, straight = uninterrupted
    a = json.loads((uninterrupted[0] / "out" / "report" / "loop.json").read_text())["per_round"]
    b = json.loads((out / "report" / "loop.json").read_text())["per_round"]
    assert b == a
    for r in (1, 2):
        weights = "round_{}/weights/last/unet/diffusion_pytorch_model.safetensors".format(r)
        assert (out / weights).read_bytes() == (uninterrupted[0] / "out" / weights).read_bytes()


def test_a_rerun_with_other_settings_is_refused_naming_them(uninterrupted, tmp_path):
    root, _ = uninterrupted
    with pytest.raises(UserError, match=r"samples: 2 then, 3 now"):
        _loop(root, extra=["loop.samples=3"])
    with pytest.raises(UserError, match=r"config.dpo.beta: 2000 then, 1000 now"):
        _loop(root, extra=["dpo.beta=1000"])


def test_bad_loop_settings_are_refused_by_key(tmp_path):
    bad = {"loop.reference=parent": "loop.reference", "loop.holdout_fraction=1.0": "loop.holdout_fraction",
           "loop.samples=1": "loop.samples", "loop.pairs.max_motion_drop=1.5": "loop.pairs.max_motion_drop",
           "loop.rnds=3": "loop.rnds", "eval.judges=[temporal_flickering]": "eval.judges"}
    for override, key in bad.items():
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            _loop(tmp_path, run=lambda argv: pytest.fail("no verb runs"), extra=[override])
    with pytest.raises(UserError, match="loop sets the starting weights"):
        _loop(tmp_path, run=lambda argv: pytest.fail("no verb runs"), extra=["model.init_weights=/w"])
    with pytest.raises(UserError, match="loop.reference=previous needs model.finetune=full"):
        _loop(tmp_path, run=lambda argv: pytest.fail("no verb runs"),
              extra=["loop.reference=previous", "model.finetune=lora"])


def test_reference_previous_trains_on_top_of_the_previous_round(tmp_path):
    """One round of reference: previous needs round 1; its promotion (a full network) samples without init weights."""
    run_weights = tmp_path / "run" / "weights" / "last"
    (run_weights / "unet").mkdir(parents=True)
    (run_weights / "unet" / "w.safetensors").write_bytes(b"tensor bytes")
    (run_weights / "trainable.json").write_text(json.dumps({"family": "toy", "finetune": "full",
                                                            "init_weights": "/loop/round_1/weights/last"}))
    target = promote_weights(run_weights, tmp_path / "round_2" / "weights" / "last", "previous")
    meta = json.loads((target / "trainable.json").read_text())
    assert meta["init_weights"] is None and meta["loop_trained_on"] == "/loop/round_1/weights/last"
    assert (target / "unet" / "w.safetensors").read_bytes() == b"tensor bytes"
    assert json.loads((run_weights / "trainable.json").read_text())["init_weights"] == "/loop/round_1/weights/last"
    (run_weights / "trainable.json").write_text(json.dumps({"family": "toy", "finetune": "lora"}))
    with pytest.raises(UserError, match="needs full fine-tune weights"):
        promote_weights(run_weights, tmp_path / "round_3" / "weights" / "last", "previous")


def test_the_loop_verb_exits_3_and_stops_when_a_round_is_flagged(tmp_path, monkeypatch):
    """A judge that falls while the OmniScore rises: loop.stop_on_hacking stops after round 1, exit status 3."""
    import videotuna_dpo.pipeline.loop_report as loop_report

    real = loop_report.round_record

    def flagged(out, r):
        record = real(out, r)
        return {**record, "possible_reward_hacking": True, "warnings": ["possible reward hacking: made up"]}

    monkeypatch.setattr(loop_report, "round_record", flagged)
    code = main(["loop", "--config", str(DEMO_CONFIG), "--prompts", str(_prompts(tmp_path)), "--rounds", "2",
                 "--out", str(tmp_path / "out"), *TINY, "loop.stop_on_hacking=true", "lightning.trainer.max_steps=1"])
    assert code == 3
    report = json.loads((tmp_path / "out" / "report" / "loop.json").read_text())
    assert report["stopped_after"] == 1 and report["rounds_done"] == 1 and report["possible_reward_hacking"] is True
    assert not (tmp_path / "out" / "round_2").exists()
    assert "POSSIBLE REWARD HACKING" in report["summary_line"]


def test_the_loop_runs_on_the_tiny_cogvideox_with_lora(tiny_cogvideox, tmp_path):
    """Two rounds on a real architecture (LoRA, v-prediction, VAE latents in the cache), reference: base."""
    from tests.conftest import ROOT

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(c + "\n" for c in CAPTIONS[:4]))
    summary = run_loop(ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml", prompts, tmp_path / "out", rounds=2, overrides=[
        f"model.pretrained={tiny_cogvideox}", "generate.steps=2", "generate.height=32", "generate.width=32",
        "data.video_length=4", "lightning.trainer.max_steps=2", "lightning.checkpoint.every_n_train_steps=2",
        "lightning.trainer.enable_progress_bar=false", "loop.samples=2", "loop.eval_samples=2",
        "eval.scorers=[temporal_flickering,dynamic_degree,motion_smoothness]"], run=main, progress=lambda line: None)
    out = tmp_path / "out"
    assert summary["rounds_done"] == 2
    meta = json.loads((out / "round_2" / "weights" / "last" / "trainable.json").read_text())
    assert meta["finetune"] == "lora" and meta["init_weights"] is None
    assert OmegaConf.load(out / "round_2" / "run" / "config.yaml").model.trainable_weights == \
        str(out / "round_1" / "weights" / "last")
    report = json.loads((out / "report" / "loop.json").read_text())
    assert len(report["per_round"]["omniscore"]) == 3 and report["rounds"][1]["against"]["round_1"]["pairs"] == 2
    index = json.loads((out / "round_2" / "cache" / "index.json").read_text())
    assert index["settings"]["backend"] == "cogvideox"


def test_reference_previous_makes_round_1_the_reference_of_round_2(tmp_path):
    summary = run_loop(DEMO_CONFIG, _prompts(tmp_path), tmp_path / "out", rounds=2, run=main,
                       overrides=[*TINY, "loop.reference=previous", "lightning.trainer.max_steps=1"],
                       progress=lambda line: None)
    out = tmp_path / "out"
    assert summary["rounds_done"] == 2
    round_1 = out / "round_1" / "weights" / "last"
    cfg = OmegaConf.load(out / "round_2" / "run" / "config.yaml")
    assert cfg.model.init_weights == str(round_1) and cfg.model.get("trainable_weights") is None
    run_meta = json.loads((out / "round_2" / "run" / "weights" / "last" / "trainable.json").read_text())
    assert run_meta["init_weights"] == str(round_1.resolve())
    # The round's weights are the whole network: sampled and evaluated on the base config as they are.
    meta = json.loads((out / "round_2" / "weights" / "last" / "trainable.json").read_text())
    assert meta["init_weights"] is None and meta["loop_trained_on"] == str(round_1.resolve())
    assert (out / "eval" / "scores" / "round_2.jsonl").is_file()


def test_the_toy_rounds_table_is_the_loops_report(uninterrupted):
    """`python -m videotuna_dpo.toy.rounds` tabulates each seed's loop summary: its numbers are the report's."""
    from videotuna_dpo.toy.rounds import loop_overrides, round_rows, summarize

    _, summary = uninterrupted
    rows = round_rows(summary)
    report = summary["rounds"]
    for r, row in enumerate(rows):
        omni = next(x for x in report[r]["against"]["base"]["rows"] if x["dimension"] == "omniscore")
        judge = next(x for x in report[r]["against"]["base"]["rows"] if x["dimension"] == "raw/toy_alignment")
        assert (row["omniscore"], row["omniscore_delta"], row["omniscore_z"]) == (omni["tuned"], omni["delta"], omni["z"])
        assert (row["toy_alignment"], row["toy_alignment_delta"]) == (judge["tuned"], judge["delta"])
    assert rows[0]["omniscore_delta_prev"] is None and rows[1]["omniscore_delta_prev"] is not None
    table = summarize({0: rows, 1: rows}, ["toy_alignment"]).splitlines()
    assert table[0] == "2 seed(s): 0, 1" and len(table) == 4
    assert table[2].startswith(f"1 | {rows[0]['omniscore_delta']:+.4f} +- 0.0000 | ")
    assert "eval.judges=[toy_travel,toy_shape_fidelity,toy_alignment]" in loop_overrides(0, hack=True)
    assert "eval.scorers=[temporal_flickering,motion_smoothness]" in loop_overrides(0, hack=True)


def test_a_finished_rounds_files_may_be_cleaned_up_but_not_the_weights_the_next_round_needs(tmp_path):
    out = tmp_path / "out"
    _loop(tmp_path, rounds=1, extra=["lightning.trainer.max_steps=1"])
    import shutil

    shutil.rmtree(out / "round_1" / "cache")  # round 1 is finished: its cache is not needed again
    assert _loop(tmp_path, run=lambda argv: pytest.fail("nothing to do"), rounds=1,
                 extra=["lightning.trainer.max_steps=1"])["rounds_done"] == 1
    shutil.rmtree(out / "round_1" / "weights")  # but round 2 starts from round 1's weights
    with pytest.raises(UserError, match=r"round_1/weights/last/trainable\.json is missing, but .*loop_state\.json "
                                        r"records round 1's weights step as finished"):
        _loop(tmp_path, run=lambda argv: pytest.fail("no verb runs"), rounds=2,
              extra=["lightning.trainer.max_steps=1"])


def test_a_loop_training_on_two_ddp_processes_runs_each_step_once(tmp_path):
    """Lightning starts rank 1 by running again the command rank 0 was started with. The loop runs its verbs in its
    own process, so a loop that trained in-process was rerun whole on rank 1: every step twice, and in round 2 rank
    1's `pairs` ran before rank 0's `score` had written its scores, and the run died. The loop now starts
    `videotuna train` in a process of its own when training takes several processes."""
    import sys

    from tests.conftest import ROOT, ddp_env, run_ddp

    proc = run_ddp(
        [sys.executable, "-m", "videotuna_dpo", "loop", "--config", str(DEMO_CONFIG), "--prompts",
         str(_prompts(tmp_path)), "--rounds", "2", "--out", str(tmp_path / "out"), *TINY,
         "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp", "lightning.trainer.accelerator=cpu"],
        env=ddp_env(PYTHONPATH=str(ROOT)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = ["generate", "score", "pairs", "cache", "train", "weights", "eval", "compare"]
    assert [line for line in proc.stdout.splitlines() if line.startswith("== loop round")] == [
        f"== loop round {r}/2: {step} ==" for r in (1, 2) for step in steps]
    assert proc.stderr.count("[rank: 1] Seed set to") == 2  # each round's training had its rank 1
    for r in (1, 2):
        assert json.loads((tmp_path / "out" / f"round_{r}" / "run" / "run.json").read_text())["global_step"] == 4
    assert json.loads((tmp_path / "out" / "report" / "loop.json").read_text())["rounds_done"] == 2


def test_a_loop_that_cannot_start_training_apart_refuses_several_processes(tmp_path):
    with pytest.raises(UserError, match=r"training runs on 2 processes, and this loop has no way to start "):
        run_loop(DEMO_CONFIG, _prompts(tmp_path), tmp_path / "out", rounds=1, run=main,
                 overrides=[*TINY, "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
                            "lightning.trainer.accelerator=cpu"], progress=lambda line: None)
    assert not (tmp_path / "out").exists()
