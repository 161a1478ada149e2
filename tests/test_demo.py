"""The embedded demo: the whole loop on the toy world, with fixed seeds, must improve the base."""

import csv
import json
import math
import statistics

import pytest
from omegaconf import OmegaConf

from videotuna_dpo.cli import main
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.demo import FLOW_DEMO_CONFIG, run_demo, write_demo_config
from videotuna_dpo.pipeline.evaluate import table_row


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, run=main)


def test_dpo_beats_the_base_on_held_out_seeds(demo):
    _, summary = demo
    assert summary["passed"] is True
    assert summary["delta"] > 0
    assert summary["paired_z"] > 2.0
    assert summary["win_rate"] > 0.5
    assert summary["paired_videos"] == 128


def test_report_table_equals_the_scores_files(demo):
    out, summary = demo
    report = json.loads((out / "report" / "report.json").read_text())
    table = report["tables"]["run"]
    scores = {}
    for label in ("base", "run"):
        rows = [json.loads(line) for line in (out / "report" / "scores" / f"{label}.jsonl").read_text().splitlines()]
        scores[label] = {r["meta"]["prompt_id"] + f"_s{r['meta']['sample']}": r for r in rows if r["status"] == "ok"}
    keys = sorted(scores["base"])
    assert keys == sorted(scores["run"]) and len(keys) == 128
    row = table_row(table, "omniscore")
    assert row["base"] == pytest.approx(statistics.mean(scores["base"][k]["omniscore"] for k in keys), abs=1e-12)
    assert row["tuned"] == pytest.approx(statistics.mean(scores["run"][k]["omniscore"] for k in keys), abs=1e-12)
    wins = sum(1.0 if scores["run"][k]["omniscore"] > scores["base"][k]["omniscore"] else
               0.5 if scores["run"][k]["omniscore"] == scores["base"][k]["omniscore"] else 0.0 for k in keys)
    assert row["win_rate"] == pytest.approx(wins / len(keys))
    align = table_row(table, "raw/toy_alignment")
    assert align["base"] == pytest.approx(statistics.mean(scores["base"][k]["raw"]["toy_alignment"] for k in keys))
    assert summary["omniscore_base"] == row["base"] and summary["omniscore_tuned"] == row["tuned"]
    html = (out / "report" / "report.html").read_text()
    assert "omniscore" in html and "grids/" in html


def test_the_loop_left_every_artifact(demo):
    out, _ = demo
    assert len(list((out / "samples").glob("*.mp4"))) == 32 * 4 * 4  # 32 captions x 4 entries x 4 samples
    manifest = json.loads((out / "pairs" / "pairs" / "manifest.json").read_text())
    assert len(manifest["pairs"]) == 128 and manifest["reweighting"]["alpha"] == 1.0
    assert json.loads((out / "run" / "run.json").read_text())["global_step"] == 100
    assert (out / "cache" / "index.json").is_file()
    for png in ("omniscore_hist", "weight_hist"):
        assert (out / "pairs" / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


# Flow-DPO (`videotuna demo --flow`): the full self-check takes minutes (README figures); here a short loop
# (32 prompts, 20 steps, 8 sampler steps) through the same code path, its figures checked against its files.
FLOW_SHORT = dict(flow=True, rounds=1, eval_samples=1, steps=20,
                  overrides=["generate.steps=8", "lightning.trainer.log_every_n_steps=1"])


@pytest.fixture(scope="module")
def flow_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow_demo")
    return out, run_demo(out, **FLOW_SHORT, run=main)


def test_flow_demo_trains_toy_flow_from_the_reference_with_its_beta_schedule(flow_demo):
    out, summary = flow_demo
    cfg = OmegaConf.load(out / "run" / "config.yaml")
    assert cfg.model.name == "toy_flow" and summary["model"] == "toy_flow"
    flow_dpo = OmegaConf.load(FLOW_DEMO_CONFIG).dpo  # what demo_flow.yaml sets reaches the run
    assert (cfg.dpo.beta, cfg.dpo.beta_schedule) == (flow_dpo.beta, flow_dpo.beta_schedule)
    rows = [r for r in csv.DictReader(open(out / "run" / "logs" / "version_0" / "metrics.csv")) if r.get("train/loss")]
    first = {k: float(v) for k, v in rows[0].items() if v}
    # Step 0: policy == reference, so margin 0 and each pair's loss is log 2 (times its re-weighting weight).
    assert first["step"] == 0 and first["train/reward_margin"] == 0.0
    assert (first["train/model_err_w"], first["train/model_err_l"]) == (first["train/ref_err_w"], first["train/ref_err_l"])
    assert 0.5 * math.log(2) < first["train/loss"] < 2 * math.log(2)
    assert any(float(r["train/reward_margin"]) != 0.0 for r in rows[1:])  # and then the policy moves
    assert json.loads((out / "run" / "run.json").read_text())["global_step"] == 20
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == 32 * 4 and {r["meta"]["model"]["name"] for r in records} == {"toy_flow"}


def test_flow_demo_self_check_is_its_report(flow_demo):
    out, summary = flow_demo
    row = table_row(json.loads((out / "report" / "report.json").read_text())["tables"]["run"], "omniscore")
    assert summary["paired_videos"] == row["n"] == 32
    assert (summary["delta"], summary["paired_z"], summary["win_rate"]) == (row["delta"], row["z"], row["win_rate"])
    assert summary["passed"] is (row["delta"] > 0 and row["z"] > 2 and row["win_rate"] > 0.5)
    assert json.loads((out / "demo_summary.json").read_text()) == summary


def test_the_demo_refuses_an_output_directory_of_the_other_model(tmp_path):
    flow_cfg = OmegaConf.load(write_demo_config(tmp_path, flow=True))
    assert flow_cfg.model.name == "toy_flow" and flow_cfg.model.pretrained == "builtin"
    assert flow_cfg.generate.steps == 20 and flow_cfg.data.batch_size == 8  # the rest is demo.yaml's
    with pytest.raises(UserError, match="holds a demo of model 'toy_flow', not 'toy'"):
        write_demo_config(tmp_path, flow=False)
