"""Guards against reward hacking, on hand-made score files: each guard triggers, and stays quiet, on values."""

from __future__ import annotations

import json
import math

import pytest

from videotuna_dpo.cli import main
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.evaluate import compare_scores, table_row
from videotuna_dpo.eval_callback import check_judges
from videotuna_dpo.pipeline.guards import check_table, motion_drop
from videotuna_dpo.pipeline.pairs import build_pairs_dataset
from videotuna_dpo.pipeline.report import write_report

BASE_OMNI = [0.50, 0.52, 0.48, 0.51, 0.49, 0.50]
RISE = [0.010, 0.012, 0.008, 0.011, 0.009, 0.010]  # the training OmniScore rises: mean +0.01
FALL = [-0.10, -0.12, -0.08, -0.11, -0.09, -0.10]  # a significant fall: mean -0.1, z = -10 sqrt(3)
NOISE = [-0.10, 0.08, -0.09, 0.07, -0.02, 0.00]  # a fall within the noise: mean -0.01


def _scores(path, omni, judge, motion, dynamic=None):
    """One eval scores file: six videos of one prompt, paired by prompt_id and sample."""
    lines = []
    for k, (o, j, m) in enumerate(zip(omni, judge, motion)):
        raw = {"temporal_flickering": o, "toy_alignment": j, "motion_magnitude": m,
               "dynamic_degree": 1.0 if dynamic is None else dynamic[k]}
        lines.append(json.dumps({"path": f"{path.stem}/p_s{k}.mp4", "status": "ok", "prompt": "a red square moving left",
                                 "omniscore": o, "quality": o, "raw": raw, "normalized": {"temporal_flickering": o},
                                 "meta": {"prompt_id": "p", "sample": k, "seed": 100 + k}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(tmp_path, omni_diff, judge_diff, motion_scale=1.0, dynamic_tuned=None):
    judge = [0.8, 0.7, 0.9, 0.75, 0.85, 0.8]
    motion = [2.0, 2.2, 1.8, 2.1, 1.9, 2.0]
    base = _scores(tmp_path / "base.jsonl", BASE_OMNI, judge, motion)
    tuned = _scores(tmp_path / "tuned.jsonl", [b + d for b, d in zip(BASE_OMNI, omni_diff)],
                    [b + d for b, d in zip(judge, judge_diff)], [m * s for m, s in zip(motion, motion_scale)]
                    if isinstance(motion_scale, list) else [m * motion_scale for m in motion], dynamic_tuned)
    return compare_scores(base, tuned)


def test_a_judge_falling_while_the_training_omniscore_rises_is_possible_reward_hacking(tmp_path):
    table = _table(tmp_path, RISE, FALL)
    guards = check_table(table, ["toy_alignment"], "run", "base")
    judge = table_row(table, "raw/toy_alignment")
    assert judge["delta"] == pytest.approx(-0.1) and judge["z"] == pytest.approx(-10 * math.sqrt(3))
    assert table_row(table, "omniscore")["delta"] == pytest.approx(0.01)
    assert guards["possible_reward_hacking"] is True and guards["motion_drop"] is False
    assert guards["judges"] == [judge]
    assert guards["warnings"] == ["possible reward hacking: run vs base: training OmniScore +0.0100 (z "
                                  f"{table_row(table, 'omniscore')['z']:.2f}) while judge toy_alignment falls -0.1000 "
                                  "(paired z -17.32 < -2)"]


def test_a_judge_falling_within_its_noise_or_with_the_omniscore_is_not_flagged(tmp_path):
    noisy = _table(tmp_path, RISE, NOISE)
    assert table_row(noisy, "raw/toy_alignment")["z"] == pytest.approx(-0.01 / (math.sqrt(
        sum((d + 0.01) ** 2 for d in NOISE) / 5) / math.sqrt(6)))
    assert -2 < table_row(noisy, "raw/toy_alignment")["z"] < 0
    assert check_table(noisy, ["toy_alignment"])["possible_reward_hacking"] is False
    both_fall = _table(tmp_path, [-d for d in RISE], FALL)  # worse everywhere: a bad run, not a hacked scorer
    guards = check_table(both_fall, ["toy_alignment"])
    assert guards["possible_reward_hacking"] is False and guards["warnings"] == []
    # A scorer that is not a judge never flags, however far it falls.
    assert check_table(_table(tmp_path, RISE, FALL), [])["possible_reward_hacking"] is False


def test_a_tuned_model_moving_significantly_less_is_a_motion_warning(tmp_path):
    halved = _table(tmp_path, RISE, [0.0] * 6, motion_scale=0.5)
    row = table_row(halved, "raw/motion_magnitude")
    assert row["base"] == pytest.approx(2.0) and row["tuned"] == pytest.approx(1.0)
    assert row["z"] < -2
    guards = check_table(halved, ["toy_alignment"], "run", "base")
    assert guards["motion_drop"] is True and guards["possible_reward_hacking"] is False
    assert [r["dimension"] for r in guards["motion"]] == ["raw/dynamic_degree", "raw/motion_magnitude"]
    assert guards["warnings"] == [f"motion drop: run vs base: motion_magnitude 2 -> 1 (paired z {row['z']:.2f} < -2): "
                                  "the tuned model moves significantly less"]
    # dynamic_degree from all moving to all static: every difference -1, z = -inf.
    static = _table(tmp_path, RISE, [0.0] * 6, dynamic_tuned=[0.0] * 6)
    assert table_row(static, "raw/dynamic_degree")["z"] == -math.inf
    assert check_table(static)["motion_drop"] is True


def test_motion_that_rises_or_falls_within_its_noise_stays_quiet(tmp_path):
    assert check_table(_table(tmp_path, RISE, [0.0] * 6, motion_scale=1.3))["motion_drop"] is False
    wobble = _table(tmp_path, RISE, [0.0] * 6, motion_scale=[0.9, 1.1, 0.95, 1.05, 0.97, 1.0])
    assert -2 < table_row(wobble, "raw/motion_magnitude")["z"] < 0
    guards = check_table(wobble, ["toy_alignment"])
    assert guards["motion_drop"] is False and guards["warnings"] == []


def test_the_eval_report_shows_training_scorers_judges_and_motion_apart_with_the_warnings(tmp_path):
    table = _table(tmp_path, RISE, FALL, motion_scale=0.5)
    table["guards"] = check_table(table, ["toy_alignment"], "run", "base")
    summary = {"tables": {"run": table}, "settings": {"scorers": ["temporal_flickering"], "judges": ["toy_alignment"],
                                                      "measured": ["dynamic_degree", "motion_magnitude", "toy_alignment"]}}
    write_report(tmp_path / "report", summary, grid_prompts=0)
    page = (tmp_path / "report" / "report.html").read_text()
    training, rest = page.split("<h3>Judges (never used in training)</h3>")
    judges, motion = rest.split("<h3>Motion (measured, not in the OmniScore)</h3>")
    assert "raw/temporal_flickering" in training and "raw/toy_alignment" not in training
    assert "raw/toy_alignment" in judges and "raw/motion_magnitude" not in judges
    assert "raw/motion_magnitude" in motion and "raw/dynamic_degree" in motion
    assert page.count("class='warn'") == 2 and "possible reward hacking: run vs base" in page
    saved = json.loads((tmp_path / "report" / "report.json").read_text())["tables"]["run"]["guards"]
    assert saved["possible_reward_hacking"] is True and saved["motion_drop"] is True


def test_a_judge_that_also_scores_the_training_is_refused():
    check_judges(["temporal_flickering"], ["toy_alignment"])
    with pytest.raises(UserError, match="eval.judges: temporal_flickering also score the training"):
        check_judges(["temporal_flickering", "dynamic_degree"], ["temporal_flickering"])
    with pytest.raises(UserError, match="lists a judge twice"):
        check_judges([], ["toy_alignment", "toy_alignment"])


# ---------------------------------------------------------------- pairs --motion-guard


def _pair_scores(path, motions):
    """Two prompts; per prompt the winner (0.7 / 0.6) and the loser (0.5 / 0.3) with the given motions."""
    rows = [("a", 0.7, motions[0]), ("a", 0.5, motions[1]), ("b", 0.6, motions[2]), ("b", 0.3, motions[3])]
    lines = []
    for n, (prompt, omni, motion) in enumerate(rows):
        raw = {"temporal_flickering": 0.9} | ({} if motion is None else {"motion_magnitude": motion})
        lines.append(json.dumps({"path": str(path.parent / "samples" / f"{prompt}_{n}.mp4"), "status": "ok",
                                 "prompt": prompt, "omniscore": omni, "raw": raw,
                                 "normalized": {"temporal_flickering": omni}, "quality": omni, "frames": 8}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_motion_guard_refuses_a_pair_whose_winner_moves_much_less_and_lists_it(tmp_path, capsys):
    scores = _pair_scores(tmp_path / "scores.jsonl", [0.4, 1.0, 0.9, 1.0])  # drops 0.6 and 0.1
    code = main(["pairs", "--scores", str(scores), "--out", str(tmp_path / "ds"), "--motion-guard",
                 "--max-motion-drop", "0.5"])
    assert code == 0
    assert "--motion-guard: 1 pair(s) refused" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "ds" / "pairs" / "manifest.json").read_text())
    assert [p["prompt"] for p in manifest["pairs"]] == ["b"]
    guard = manifest["motion_guard"]
    assert guard["measure"] == "raw/motion_magnitude" and guard["max_motion_drop"] == 0.5
    assert guard["refused"] == [{"winner": str(tmp_path / "samples" / "a_0.mp4"),
                                 "loser": str(tmp_path / "samples" / "a_1.mp4"), "prompt": "a",
                                 "winner_motion": 0.4, "loser_motion": 1.0, "drop": pytest.approx(0.6)}]
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["motion_refused"] == 1


def test_motion_guard_stays_quiet_when_winners_move_enough(tmp_path):
    scores = _pair_scores(tmp_path / "scores.jsonl", [0.4, 1.0, 1.2, 1.0])
    summary = build_pairs_dataset(scores, tmp_path / "ds", max_motion_drop=0.7, plots=False)
    manifest = json.loads((tmp_path / "ds" / "pairs" / "manifest.json").read_text())
    assert summary["pairs"] == 2 and summary["motion_refused"] == 0 and manifest["motion_guard"]["refused"] == []
    build_pairs_dataset(scores, tmp_path / "ds2", plots=False)  # without the guard: no entry, nothing refused
    assert json.loads((tmp_path / "ds2" / "pairs" / "manifest.json").read_text())["motion_guard"] is None
    assert motion_drop(1.2, 1.0) == pytest.approx(-0.2) and motion_drop(0.5, 0.0) == 0.0


def test_motion_guard_needs_motion_scores_and_a_drop_in_range(tmp_path, capsys):
    scores = _pair_scores(tmp_path / "scores.jsonl", [0.4, None, 0.9, 1.0])
    with pytest.raises(UserError, match=r"scores\.jsonl: the record of .*a_1\.mp4 has no motion_magnitude score"):
        build_pairs_dataset(scores, tmp_path / "ds", max_motion_drop=0.5, plots=False)
    good = _pair_scores(tmp_path / "good.jsonl", [0.4, 1.0, 0.9, 1.0])
    with pytest.raises(UserError, match=r"--max-motion-drop must be in \[0, 1\)"):
        build_pairs_dataset(good, tmp_path / "ds", max_motion_drop=1.0, plots=False)
    assert main(["pairs", "--scores", str(good), "--out", str(tmp_path / "ds"), "--max-motion-drop", "0.3"]) == 2
    assert "--max-motion-drop applies to --motion-guard" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
