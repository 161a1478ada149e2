"""The embedded demo: the whole loop on the toy world, with fixed seeds, must improve the base."""

import json
import statistics

import pytest

from videotuna_dpo.pipeline.demo import run_demo
from videotuna_dpo.pipeline.evaluate import table_row


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out)


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
