"""`videotuna eval`: base vs tuned on the same seeds, the comparison table, the report, the training callback."""

import csv
import json
import math
import re
import shutil
import subprocess
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT
from videotuna_dpo.errors import UserError
from videotuna_dpo.eval_callback import EvalCallback, eval_callback
from videotuna_dpo.pipeline.evaluate import (
    compare_scores, evaluate, paired_z, resolve_weights, table_row, weight_labels,
)

CONFIG = ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"
PROMPTS = ["a red square moving left", "a blue circle moving up"]
NO_WEIGHTS = ["temporal_flickering", "dynamic_degree", "motion_smoothness"]


def _config(pretrained):
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(pretrained)
    return cfg


def _tuned_weights(pretrained, directory):
    """LoRA adapters of the tiny config perturbed at random and saved as a run's weights/last."""
    from videotuna_dpo.models.cogvideox import CogVideoXBackend

    backend = CogVideoXBackend.from_config(_config(pretrained).model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in backend.transformer.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return backend.save_trainable(directory)


@pytest.fixture(scope="module")
def evaluated(tiny_cogvideox, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    _tuned_weights(tiny_cogvideox, root / "run" / "weights" / "last")
    proc = subprocess.run(
        [sys.executable, "-m", "videotuna_dpo", "eval", "--config", str(CONFIG),
         "--prompts", str(root / "prompts.txt"), "--num-samples", "2", "--out", str(root / "report"),
         "--seed", "1000", "--scorers", ",".join(NO_WEIGHTS), "--no-progress", f"model.pretrained={tiny_cogvideox}", "generate.steps=2",
         "--weights", str(root / "run")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def _ok(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["status"] == "ok"]


def test_report_table_equals_the_means_of_the_scores_files(evaluated):
    root, _ = evaluated
    report = json.loads((root / "report" / "report.json").read_text())
    table = report["tables"]["run"]
    base, tuned = _ok(root / "report" / "scores" / "base.jsonl"), _ok(root / "report" / "scores" / "run.jsonl")
    assert len(base) == len(tuned) == 4 and table["pairs"] == 4
    assert table["unpaired"] == {"base": 0, "tuned": 0} and table["failed"] == {"base": 0, "tuned": 0}

    def mean(records, dimension):
        if "/" in dimension:
            group, name = dimension.split("/")
            return sum(r[group][name] for r in records) / len(records)
        return sum(r[dimension] for r in records) / len(records)

    expected = {"omniscore", "quality"} | {f"raw/{d}" for d in NO_WEIGHTS} | {f"normalized/{d}" for d in NO_WEIGHTS}
    expected.add("raw/motion_magnitude")  # always measured (the motion guard), never part of the OmniScore
    assert {r["dimension"] for r in table["rows"]} == expected  # no semantic scorer, no semantic row
    for row in table["rows"]:
        assert row["base"] == pytest.approx(mean(base, row["dimension"]), abs=1e-12), row["dimension"]
        assert row["tuned"] == pytest.approx(mean(tuned, row["dimension"]), abs=1e-12), row["dimension"]
        assert row["delta"] == pytest.approx(row["tuned"] - row["base"], abs=1e-12)
        assert row["n"] == 4
    omni = table_row(table, "omniscore")
    by_name = {r["path"].rsplit("/", 1)[1]: r["omniscore"] for r in base}
    diffs = [r["omniscore"] - by_name[r["path"].rsplit("/", 1)[1]] for r in tuned]
    assert omni["win_rate"] == pytest.approx(sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs) / 4)
    assert any(d != 0 for d in diffs), "the perturbed adapters change the samples"
    assert report["counts"]["base"]["videos"] == report["counts"]["run"]["videos"] == 4
    assert report["settings"]["weights"]["run"] == str((root / "run" / "weights" / "last").resolve())


def test_base_and_tuned_are_sampled_with_the_same_prompts_and_seeds(evaluated):
    root, _ = evaluated
    samples = root / "report" / "samples"
    for i in range(2):
        for k in range(2):
            base = json.loads((samples / "base" / f"p{i:05d}_s{k}.json").read_text())
            tuned = json.loads((samples / "run" / f"p{i:05d}_s{k}.json").read_text())
            assert base["seed"] == tuned["seed"] == 1000 + i * 2 + k
            assert base["prompt"] == tuned["prompt"] == PROMPTS[i]
            assert base["model"]["weights"] is None and tuned["model"]["weights"].endswith("run/weights/last")


def test_cli_prints_the_table_of_the_report(evaluated):
    root, proc = evaluated
    omni = table_row(json.loads((root / "report" / "report.json").read_text())["tables"]["run"])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("omniscore "))
    assert line.split()[1:5] == [f"{omni['base']:.4f}", f"{omni['tuned']:.4f}", f"{omni['delta']:+.4f}",
                                 f"{omni['win_rate']:.3f}"]
    assert "run vs base (4 paired videos)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == f"report: {root / 'report' / 'report.html'}"


def test_report_html_shows_existing_pngs_of_plots_and_sample_grids(evaluated):
    root, _ = evaluated
    out = root / "report"
    page = (out / "report.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert set(sources) == {"plots/deltas.png", "plots/omniscore_diff_run.png", "grids/p00000_s0.png",
                            "grids/p00001_s0.png"}
    for src in sources:
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert "<td>omniscore</td>" in page and PROMPTS[1] in page
    report = json.loads((out / "report.json").read_text())
    assert [g["prompt"] for g in report["grids"]] == PROMPTS
    assert report["grids"][0]["videos"]["run"].endswith("samples/run/p00000_s0.mp4")
    assert not list(out.rglob(".*")), "no temporary file is left"


def test_rerun_keeps_everything_and_other_weights_under_the_same_label_are_refused(evaluated, tiny_cogvideox):
    from videotuna_dpo.registry import Registry

    root, _ = evaluated
    cfg = _config(tiny_cogvideox)
    cfg.generate.steps = 2  # as the CLI run
    registry = Registry.load(cfg.plugins)
    again = evaluate(cfg, registry, root / "prompts.txt", [root / "run"], 2, root / "report", scorers=NO_WEIGHTS,
                     progress=False)
    assert again["counts"]["run"] == {"videos": 4, "generated": 0, "kept": 4, "scored": 0, "failed": 0, "skipped": 4}
    before = json.loads((root / "report" / "report.json").read_text())["tables"]["run"]["rows"]
    assert [r["tuned"] for r in again["tables"]["run"]["rows"]] == [r["tuned"] for r in before]
    other = root / "elsewhere" / "run" / "weights" / "last"
    shutil.copytree(root / "run" / "weights" / "last", other)
    with pytest.raises(UserError, match=r"p00000_s0\.json: these samples were made with weights"):
        evaluate(cfg, registry, root / "prompts.txt", [other], 2, root / "report", scorers=NO_WEIGHTS, progress=False)
    cfg.model.trainable_weights = str(other)
    with pytest.raises(UserError, match="model.trainable_weights is set .* pass those weights with --weights"):
        evaluate(cfg, registry, root / "prompts.txt", [], 2, root / "report", scorers=NO_WEIGHTS, progress=False)
    cfg.model.trainable_weights = None
    cfg.generate.steps = 3
    with pytest.raises(UserError, match=r"base/p00000_s0\.json: .*other generate settings \(steps: 2 then, 3 now\)"):
        evaluate(cfg, registry, root / "prompts.txt", [], 2, root / "report", scorers=NO_WEIGHTS, progress=False)


# ---------------------------------------------------------------- compare_scores by hand


def _record(path, prompt, omni, flicker, meta=None, status="ok"):
    if status != "ok":
        return {"path": path, "prompt": prompt, "status": status, "reason": "unreadable"}
    return {"path": path, "prompt": prompt, "status": "ok", "raw": {"temporal_flickering": flicker},
            "normalized": {"temporal_flickering": flicker - 0.5}, "quality": omni, "semantic": None,
            "omniscore": omni, "meta": meta if meta is not None else {}}


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_scores_pairs_by_prompt_and_sample_and_matches_a_hand_computation(tmp_path):
    m = lambda pid, k, seed: {"prompt_id": pid, "sample": k, "seed": seed}  # noqa: E731
    base = _write(tmp_path / "base.jsonl", [
        _record("/b/a_s0.mp4", "a", 0.5, 0.90, m("a", 0, 10)),
        _record("/b/a_s1.mp4", "a", 0.6, 0.80, m("a", 1, 11)),
        _record("/b/b_s0.mp4", "b", 0.7, 0.85, m("b", 0, 12)),
        _record("/b/loose.mp4", "c", 0.8, 0.70),  # no generation record: pairs by file stem
        _record("/b/only_base.mp4", "d", 0.1, 0.10),
        _record("/b/broken.mp4", "e", 0, 0, status="failed"),
    ])
    tuned = _write(tmp_path / "tuned.jsonl", [
        _record("/t/loose.mp4", "c", 0.7, 0.70),
        _record("/t/renamed-1.mp4", "b", 0.9, 0.95, m("b", 0, 12)),  # other file names, same generation record
        _record("/t/renamed-2.mp4", "a", 0.6, 0.80, m("a", 1, 11)),
        _record("/t/renamed-3.mp4", "a", 0.6, 0.95, m("a", 0, 10)),
    ])
    table = compare_scores(base, tuned)
    assert table["pairs"] == 4 and table["unpaired"] == {"base": 1, "tuned": 0} and table["failed"] == {"base": 1, "tuned": 0}
    # omniscore differences: a_s0 +0.1, a_s1 0 (a tie, half a win), b_s0 +0.2, loose -0.1
    omni = table_row(table, "omniscore")
    assert omni["base"] == pytest.approx(0.65) and omni["tuned"] == pytest.approx(0.70)
    assert omni["delta"] == pytest.approx(0.05)
    assert omni["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    std = math.sqrt((0.05**2 + 0.05**2 + 0.15**2 + 0.15**2) / 3)
    assert omni["z"] == pytest.approx(0.05 / (std / 2)) and omni["z"] == pytest.approx(0.7746, abs=1e-4)
    flicker = table_row(table, "raw/temporal_flickering")  # diffs +0.05, 0, +0.10, 0
    assert flicker["delta"] == pytest.approx(0.0375) and flicker["win_rate"] == pytest.approx(0.75)
    assert table_row(table, "normalized/temporal_flickering")["base"] == pytest.approx(0.8125 - 0.5)
    assert "semantic" not in [r["dimension"] for r in table["rows"]]
    assert [r["dimension"] for r in table["rows"]][:2] == ["omniscore", "quality"]
    assert {p["key"]: p["tuned_path"] for p in table["paired"]}["b_s0"] == "/t/renamed-1.mp4"


def test_z_score_of_constant_differences_is_infinite_and_reported_as_text(tmp_path):
    assert paired_z([0.1, 0.1, 0.1]) == math.inf and paired_z([-0.2, -0.2]) == -math.inf
    assert paired_z([0.0, 0.0]) == 0.0 and paired_z([0.3]) is None and paired_z([]) is None
    base = _write(tmp_path / "b.jsonl", [_record(f"/b/x_s{k}.mp4", "x", 0.5, 0.9) for k in range(3)])
    tuned = _write(tmp_path / "t.jsonl", [_record(f"/t/x_s{k}.mp4", "x", 0.6, 0.9) for k in range(3)])
    table = compare_scores(base, tuned)
    assert table_row(table)["z"] == math.inf and table_row(table)["win_rate"] == 1.0
    assert table_row(table, "raw/temporal_flickering")["z"] == 0.0
    from videotuna_dpo.pipeline.report import json_safe

    assert json.loads(json.dumps(json_safe(table)))["rows"][0]["z"] == "inf"


def _report_inputs(tmp_path, label):
    """A summary with one table: two tiny videos per side, so the report has plots and a sample grid."""
    from videotuna_dpo.data.video_io import write_video

    rows = {"base": [], "tuned": []}
    for side, omni in (("base", 0.5), ("tuned", 0.6)):
        for k in range(2):
            video = write_video(tmp_path / side / f"x_s{k}.mp4", torch.full((2, 3, 8, 8), 0.2 * k + 0.3), lossless=True)
            rows[side].append(_record(str(video), "x", omni + 0.1 * k, 0.9))
    table = compare_scores(_write(tmp_path / "b.jsonl", rows["base"]), _write(tmp_path / "t.jsonl", rows["tuned"]))
    return {"tables": {label: table}, "settings": {"seed": 1}}


def _files(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_report_that_fails_midway_leaves_the_previous_report_whole(tmp_path, monkeypatch):
    from videotuna_dpo.pipeline import report

    out = tmp_path / "report"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "keep.mp4").write_bytes(b"not the report's")
    paths = report.write_report(out, _report_inputs(tmp_path, "run"))
    before = _files(out)
    assert {"report.json", "report.html", "plots/omniscore_diff_run.png", "grids/x_s0.png"} <= set(before)
    def killed(*args):
        raise RuntimeError("killed")

    monkeypatch.setattr(report, "_page", killed)
    with pytest.raises(RuntimeError, match="killed"):  # plots, grids and report.json of "run2" were rendered
        report.write_report(out, _report_inputs(tmp_path, "run2"))
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["grids", "plots", "report.html", "report.json", "samples"]
    monkeypatch.undo()
    again = report.write_report(out, _report_inputs(tmp_path, "run2"))
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["deltas.png", "omniscore_diff_run2.png"]
    assert json.loads((out / "report.json").read_text())["plots"]["diff_run2"] == "plots/omniscore_diff_run2.png"
    assert again["html"] == paths["html"] == str(out / "report.html")
    assert again["diff_run2"] == str(out / "plots" / "omniscore_diff_run2.png")
    assert (out / "samples" / "keep.mp4").read_bytes() == b"not the report's"


def test_pairs_with_different_seeds_or_no_common_video_are_refused(tmp_path):
    base = _write(tmp_path / "b.jsonl", [_record("/b/x_s0.mp4", "x", 0.5, 0.9, {"prompt_id": "x", "sample": 0, "seed": 1})])
    other_seed = _write(tmp_path / "t.jsonl", [_record("/t/x_s0.mp4", "x", 0.5, 0.9, {"prompt_id": "x", "sample": 0, "seed": 2})])
    with pytest.raises(UserError, match=r"x_s0: seed 1 in .*b\.jsonl but 2 in .*t\.jsonl"):
        compare_scores(base, other_seed)
    unrelated = _write(tmp_path / "u.jsonl", [_record("/t/y_s0.mp4", "y", 0.5, 0.9)])
    with pytest.raises(UserError, match=r"no video of .*u\.jsonl pairs with one of .*b\.jsonl"):
        compare_scores(base, unrelated)


def test_weights_are_run_dirs_or_weights_dirs_with_unique_labels(tmp_path):
    for d in ("a/weights/last", "a/weights/step-3", "x/a/weights/last", "base/weights/last", "plain"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "trainable.json").write_text("{}")
    assert resolve_weights(tmp_path / "a") == tmp_path / "a" / "weights" / "last"
    assert resolve_weights(tmp_path / "a" / "weights" / "step-3") == tmp_path / "a" / "weights" / "step-3"
    with pytest.raises(UserError, match=r"--weights .*nowhere: neither a weights directory"):
        resolve_weights(tmp_path / "nowhere")
    dirs = [tmp_path / d for d in ("a/weights/last", "a/weights/step-3", "x/a/weights/last", "base/weights/last", "plain")]
    assert weight_labels(dirs) == ["a", "a-step-3", "a-2", "base-2", "plain"]


# ---------------------------------------------------------------- the training callback


class _ModeProbe(L.Callback):
    def __init__(self, seen):
        self.seen = seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append({name: m.training for name, m in pl_module.named_modules()})


CALLBACK_GENERATE = {"num_frames": 9, "steps": 2, "guidance": 1.0}


def _train_with(callback, tiny_cogvideox, tiny_dataset, tmp_path, max_steps, probes=()):
    """Train the tiny CogVideoX ``max_steps`` DPO steps with ``callback`` (between ``probes``); -> backend, trainer,
    the rows of metrics.csv."""
    from tests.conftest import make_backend
    from videotuna_dpo.data.datamodule import PreferenceDataModule
    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    backend = make_backend(tiny_cogvideox)
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=500.0)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-3, weight_decay=0.0)))
    dm = PreferenceDataModule.from_config(OmegaConf.create(
        {"train_data": str(tiny_dataset), "video_length": 9, "resolution": [32, 32], "batch_size": 2}))
    callbacks = [probes[0], callback, probes[1]] if probes else [callback]
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1,
                        logger=L.pytorch.loggers.CSVLogger(str(tmp_path)), callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    return backend, trainer, list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))


def test_callback_logs_the_omniscore_of_the_current_policy_and_keeps_train_mode(tiny_cogvideox, tiny_dataset, tmp_path):
    from videotuna_dpo.scoring.build import build_scorers
    from videotuna_dpo.scoring.omniscore import omniscore

    generate = CALLBACK_GENERATE
    callback = EvalCallback(2, ["a red square moving right"], seeds=[5], scorers=NO_WEIGHTS, generate_kwargs=generate)
    before, after = [], []
    backend, trainer, rows = _train_with(callback, tiny_cogvideox, tiny_dataset, tmp_path, 2,
                                         (_ModeProbe(before), _ModeProbe(after)))

    assert [h["step"] for h in callback.history] == [0, 2]  # a baseline, then every 2 steps
    assert len(before) == 2 and before == after and before[0][""] is True  # eval() would turn it off
    logged = {int(r["step"]): float(r["eval/omniscore"]) for r in rows if r.get("eval/omniscore")}
    assert logged == pytest.approx({h["step"]: h["omniscore"] for h in callback.history})
    assert {k for r in rows for k, v in r.items() if v and k.startswith("eval/")} == {
        "eval/omniscore", "eval/quality", *(f"eval/{d}" for d in NO_WEIGHTS), "eval/raw/motion_magnitude"}
    # The last value is the score of the final weights, recomputed from scratch.
    video = backend.generate(["a red square moving right"], seed=[5], **generate)
    scorers = build_scorers(NO_WEIGHTS, "cpu", {})
    expected = omniscore({n: float(s(video, ["a red square moving right"])[0]) for n, s in scorers.items()})
    assert callback.history[-1]["omniscore"] == pytest.approx(expected["omniscore"], abs=1e-9)
    assert float(trainer.callback_metrics["eval/omniscore"]) == pytest.approx(expected["omniscore"], rel=1e-6)


def test_callback_logs_judges_and_motion_apart_from_the_omniscore(tiny_cogvideox, tiny_dataset, tmp_path):
    from videotuna_dpo.scoring.build import build_scorers
    from videotuna_dpo.scoring.omniscore import omniscore

    generate = CALLBACK_GENERATE
    callback = EvalCallback(1, ["a red square moving right"], seeds=[5], scorers=["motion_smoothness"],
                            generate_kwargs=generate, judges=["temporal_flickering"])
    assert callback.measured == ["dynamic_degree", "motion_magnitude", "temporal_flickering"]
    backend, trainer, rows = _train_with(callback, tiny_cogvideox, tiny_dataset, tmp_path, 1)
    assert {k for r in rows for k, v in r.items() if v and k.startswith("eval/")} == {
        "eval/omniscore", "eval/quality", "eval/motion_smoothness", "eval/judge/temporal_flickering",
        "eval/raw/dynamic_degree", "eval/raw/motion_magnitude"}
    video = backend.generate(["a red square moving right"], seed=[5], **generate)
    scorers = build_scorers(["motion_smoothness", "temporal_flickering", "dynamic_degree"], "cpu", {})
    raw = {n: float(s(video, ["a red square moving right"])[0]) for n, s in scorers.items()}
    last = callback.history[-1]
    assert last["step"] == 1
    assert last["judge/temporal_flickering"] == pytest.approx(raw["temporal_flickering"], abs=1e-9)
    assert last["raw/dynamic_degree"] == pytest.approx(raw["dynamic_degree"], abs=1e-9)
    # The OmniScore is motion smoothness's alone: neither the judge nor the motion measures joined it.
    assert last["omniscore"] == pytest.approx(omniscore({"motion_smoothness": raw["motion_smoothness"]})["omniscore"],
                                              abs=1e-9)


def test_callback_points_out_a_judge_falling_while_the_implicit_accuracy_is_high():
    callback = EvalCallback(10, ["p"], scorers=["motion_smoothness"], judges=["toy_shape_fidelity", "aesthetic"])
    callback.history = [{"step": 0, "judge/toy_shape_fidelity": 0.8, "judge/aesthetic": 0.5},
                        {"step": 30, "judge/toy_shape_fidelity": 0.7, "judge/aesthetic": 0.6}]
    assert callback.over_optimisation(torch.tensor(0.95)) == (
        "eval at step 30: train/implicit_acc 0.95 while judge toy_shape_fidelity 0.8 -> 0.7 since step 0: the policy "
        "separates its training pairs but gets worse on what they did not measure, the sign of over-optimisation "
        "(see README, reading the logs)")
    assert callback.over_optimisation(torch.tensor(0.85)) is None  # the pairs are not yet separated
    assert callback.over_optimisation(None) is None
    callback.history[-1]["judge/toy_shape_fidelity"] = 0.8  # no judge fell
    assert callback.over_optimisation(torch.tensor(1.0)) is None
    with pytest.raises(UserError, match="eval.judges: motion_smoothness also score the training"):
        EvalCallback(10, ["p"], scorers=["motion_smoothness"], judges=["motion_smoothness"])


def test_callback_comes_from_eval_every_n_steps_and_the_eval_block():
    cfg = OmegaConf.load(CONFIG)
    assert eval_callback(cfg) is None
    cfg.eval_every_n_steps = 50
    with pytest.raises(UserError, match="eval_every_n_steps is 50 but eval.prompts is empty"):
        eval_callback(cfg, "cfg.yaml")
    cfg.eval = {"prompts": ["a red square"], "seeds": [1, 2], "scorers": ["temporal_flickering"]}
    cb = eval_callback(cfg)
    assert (cb.every, cb.prompts, cb.seeds, cb.scorer_names) == (50, ["a red square"], [1, 2], ["temporal_flickering"])
    assert cb.generate_kwargs == {"num_frames": 9, "steps": 4, "guidance": 2.0} and cb.batch_size == 4
    cfg.eval.prompt = ["typo"]
    with pytest.raises(UserError, match="unknown key 'eval.prompt'"):
        eval_callback(cfg, "cfg.yaml")
