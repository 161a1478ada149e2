"""Labels of `videotuna review` applied by `videotuna pairs --labels`: flips, drops, origins, human_weight."""

import hashlib
import json
import re

import pytest

from videotuna_dpo.cli import main
from videotuna_dpo.data.datamodule import PreferenceDataModule, normalize_weights
from videotuna_dpo.data.preference import load_pairs
from videotuna_dpo.errors import UserError
from videotuna_dpo.pipeline.pairs import build_pairs_dataset

# Every score in its own 0.01 bin: with 11 videos each has p = 1/11, so every pair's weight is 0.72 * 11 at alpha 1.
SCORES = [("a", 0.50), ("a", 0.70), ("b", 0.30), ("b", 0.60), ("c", 0.20), ("c", 0.90),
          ("d", 0.40), ("d", 0.45), ("d", 0.80), ("e", 0.10), ("e", 0.65)]
WEIGHT = 0.72 * 11


def _scores(tmp_path):
    """scores.jsonl of SCORES; video ``<prompt>_<n>.mp4`` (n counts from 1 over the whole list) holds its own name."""
    lines = []
    for n, (prompt, omni) in enumerate(SCORES, 1):
        video = tmp_path / "samples" / f"{prompt}_{n}.mp4"
        video.parent.mkdir(parents=True, exist_ok=True)
        video.write_text(video.name)
        lines.append(json.dumps({"path": str(video), "status": "ok", "prompt": prompt, "omniscore": omni,
                                 "raw": {"flicker": omni}, "normalized": {"flicker": omni}, "quality": omni,
                                 "semantic": omni, "meta": {"seed": n}, "frames": 8}))
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _ref(tmp_path, name):
    video = tmp_path / "samples" / f"{name}.mp4"
    return {"path": str(video), "sha256": hashlib.sha256(video.read_bytes()).hexdigest()}


def _labels(tmp_path, entries, kind="pairs", name="labels.json"):
    labels = []
    for first, second, label, *broken in entries:
        roles = ("winner", "loser") if kind == "pairs" else ("base", "tuned")
        entry = {roles[0]: _ref(tmp_path, first), roles[1]: _ref(tmp_path, second), "prompt": first[0], "label": label}
        if broken:
            entry["broken"] = broken[0]
        labels.append(entry)
    path = tmp_path / name
    path.write_text(json.dumps({"format": "videotuna-review-labels", "version": 1, "kind": kind,
                                "dataset": "/elsewhere/pairs", "labels": labels}))
    return path


# keep a (its pair named loser-first: a label matches the two videos whatever order the scorer gives them now),
# flip b, tie c, reject d's best video (d_9), which drops both of d's pairs that hold it; e stays the scorer's.
ENTRIES = [("a_1", "a_2", "flip"), ("b_4", "b_3", "flip"), ("c_6", "c_5", "tie"),
           ("d_9", "d_7", "reject", ["winner"])]


def _manifest(out):
    return json.loads((out / "pairs" / "manifest.json").read_text())


def _named(manifest):
    """Each pair as (winner name, loser name, origin)."""
    name = [v["path"].rsplit("/", 1)[1].removesuffix(".mp4") for v in manifest["videos"]]
    return [(name[p["winner"]], name[p["loser"]], p["origin"]) for p in manifest["pairs"]]


def test_labels_flip_confirm_and_drop_pairs_and_the_manifest_records_who_chose(tmp_path):
    scores = _scores(tmp_path)
    labels = _labels(tmp_path, ENTRIES)
    out = tmp_path / "ds"
    summary = build_pairs_dataset(scores, out, strategy="all-gap", plots=False, labels=labels)
    manifest = _manifest(out)
    assert _named(manifest) == [("a_2", "a_1", "human-confirmed"), ("b_3", "b_4", "human-flipped"),
                                ("d_8", "d_7", "scorer"), ("e_11", "e_10", "scorer")]
    assert [p["gap"] for p in manifest["pairs"]] == pytest.approx([0.2, -0.3, 0.05, 0.55])
    assert [p["weight"] for p in manifest["pairs"]] == pytest.approx([WEIGHT] * 4)
    report = manifest["labels"]
    assert {k: report[k] for k in ("labels", "confirmed", "flipped", "dropped_tie", "dropped_reject", "not_applied")} == {
        "labels": 4, "confirmed": 1, "flipped": 1, "dropped_tie": 1, "dropped_reject": 2, "not_applied": []}
    assert report["rejected_videos"] == [str(tmp_path / "samples" / "d_9.mp4")]
    assert [(d["winner"].rsplit("/", 1)[1], d["loser"].rsplit("/", 1)[1], d["reason"].split(" ")[0])
            for d in report["dropped_pairs"]] == [("c_6.mp4", "c_5.mp4", "tie"), ("d_9.mp4", "d_8.mp4", "reject:"),
                                                  ("d_9.mp4", "d_7.mp4", "reject:")]
    assert report["file"] == str(labels) and report["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert summary["pairs"] == 4 and summary["labels"]["flipped"] == 1
    # pair.json follows the flip: row 1's video1 (the winner) is b_3
    rows = json.loads((out / "pairs" / "pair.json").read_text())
    metadata = json.loads((out / "pairs" / "metadata.json").read_text())
    assert metadata[rows[1]["video1"]]["basic"]["clip_path"].endswith("b_3.mp4")
    assert metadata[rows[1]["video2"]]["basic"]["clip_path"].endswith("b_4.mp4")


def test_without_labels_every_pair_is_the_scorers(tmp_path):
    out = tmp_path / "ds"
    build_pairs_dataset(_scores(tmp_path), out, plots=False)
    manifest = _manifest(out)
    assert {p["origin"] for p in manifest["pairs"]} == {"scorer"} and manifest["labels"] is None


def test_human_weight_multiplies_the_weight_of_confirmed_and_flipped_pairs(tmp_path):
    out = tmp_path / "ds"
    build_pairs_dataset(_scores(tmp_path), out, strategy="all-gap", plots=False, labels=_labels(tmp_path, ENTRIES))
    train_data = out / "train_data.yaml"
    assert [p.weight for p in load_pairs(train_data)] == pytest.approx([WEIGHT] * 4)
    weighted = load_pairs(train_data, weights="manifest", human_weight=3.0)
    assert [p.weight for p in weighted] == pytest.approx([3 * WEIGHT, 3 * WEIGHT, WEIGHT, WEIGHT])
    assert [p.weight for p in normalize_weights(weighted)] == pytest.approx([1.5, 1.5, 0.5, 0.5])
    # on top of plain DPO weights (data.weights: none) and of the official pair_score weights alike
    assert [p.weight for p in load_pairs(train_data, weights="none", human_weight=2.0)] == [2.0, 2.0, 1.0, 1.0]
    official = load_pairs(train_data, weights="pair_score", human_weight=2.0)
    assert [p.weight for p in official] == pytest.approx([2 * WEIGHT, 2 * WEIGHT, WEIGHT, WEIGHT])

    module = PreferenceDataModule.from_config({"train_data": str(train_data), "video_length": 1, "human_weight": 3.0})
    assert module.cfg.human_weight == 3.0
    with pytest.raises(UserError, match=r"bad value for 'data.human_weight': 0.0 \(expected a finite number > 0\)"):
        PreferenceDataModule.from_config({"train_data": str(train_data), "human_weight": 0.0})


def test_the_cli_applies_labels_and_prints_what_they_did(tmp_path, capsys):
    scores, labels = _scores(tmp_path), _labels(tmp_path, ENTRIES + [("e_10", "a_1", "keep")])
    out = tmp_path / "ds"
    assert main(["pairs", "--scores", str(scores), "--out", str(out), "--strategy", "all-gap",
                 "--labels", str(labels)]) == 0
    captured = capsys.readouterr()
    assert (f"labels {labels}: 1 pair(s) confirmed, 1 flipped, 1 dropped as ties, 2 dropped with 1 rejected video(s)"
            in captured.out)
    assert "1 label(s) name pairs this dataset does not have (another --strategy or --min-gap?) and were not " \
           "applied: labels[4]" in captured.err


def _refused(tmp_path, labels, message):
    out = tmp_path / "ds"
    with pytest.raises(UserError, match=message):
        build_pairs_dataset(tmp_path / "scores.jsonl", out, strategy="all-gap", plots=False, labels=labels)
    assert not out.exists()


def test_labels_of_another_dataset_are_refused(tmp_path):
    _scores(tmp_path)
    other = tmp_path / "other"
    _scores(other)
    labels = _labels(other, ENTRIES[:2])
    _refused(tmp_path, labels, re.escape(f"{labels}: none of the 4 videos its labels name is in "
                                         f"{tmp_path / 'scores.jsonl'}: these labels are for another dataset "
                                         f"(they were made on /elsewhere/pairs)"))


def test_a_label_naming_a_video_missing_from_the_scores_is_refused_by_name(tmp_path):
    _scores(tmp_path)
    (tmp_path / "samples" / "z_99.mp4").write_text("not scored")
    labels = _labels(tmp_path, [ENTRIES[0], ("a_1", "z_99", "keep")])
    _refused(tmp_path, labels, re.escape(f"{labels}: labels[1] names loser video {tmp_path / 'samples' / 'z_99.mp4'}, "
                                         f"which is not in {tmp_path / 'scores.jsonl'}"))


def test_a_label_for_a_video_that_changed_is_refused_by_name(tmp_path):
    _scores(tmp_path)
    labels = _labels(tmp_path, ENTRIES)
    (tmp_path / "samples" / "b_4.mp4").write_text("regenerated")
    _refused(tmp_path, labels, re.escape(f"{labels}: labels[1] names winner video {tmp_path / 'samples' / 'b_4.mp4'} "
                                         f"with sha256 ") + r"[0-9a-f]{12}\.\.\., but the file now has [0-9a-f]{12}\.\.\.: "
                                                            r"the video changed after it was labelled")


@pytest.mark.parametrize("edit, message", [
    (lambda doc: doc["labels"][0].update(label="maybe"), r"labels\[0\]\.label: expected one of keep, flip, tie, reject, got 'maybe'"),
    (lambda doc: doc["labels"][1]["loser"].update(sha256="abc"), r"labels\[1\]\.loser\.sha256: expected 64 lowercase hex digits, got 'abc'"),
    (lambda doc: doc["labels"][0].pop("winner"), r"labels\[0\]\.winner: expected \{\"path\": \.\.\., \"sha256\": \.\.\.\}"),
    (lambda doc: doc["labels"][3].pop("broken"), r"labels\[3\]\.broken: a reject names its broken video\(s\)"),
    (lambda doc: doc["labels"][0].update(broken=["winner"]), r"labels\[0\]\.broken: only a reject names broken videos"),
    (lambda doc: doc["labels"].append(dict(doc["labels"][0], label="tie")),
     r"labels\[0\] and labels\[4\] both label the pair"),
    (lambda doc: doc.update(kind="eval"), r"these labels were made on an eval report \(\"kind\": 'eval'\), not on a preference dataset"),
    (lambda doc: doc.update(format="something"), r"not a labels file of `videotuna review`"),
    (lambda doc: doc.update(labels={}), r"\"labels\" must be a list of labels, got dict"),
])
def test_a_malformed_labels_file_is_refused_naming_the_key(tmp_path, edit, message):
    _scores(tmp_path)
    labels = _labels(tmp_path, ENTRIES)
    doc = json.loads(labels.read_text())
    edit(doc)
    labels.write_text(json.dumps(doc))
    _refused(tmp_path, labels, re.escape(str(labels)) + ".*" + message)


def test_a_labels_file_that_is_not_json_is_refused_by_the_cli_with_exit_code_2(tmp_path, capsys):
    labels = tmp_path / "labels.json"
    labels.write_text("{not json")
    assert main(["pairs", "--scores", str(_scores(tmp_path)), "--out", str(tmp_path / "ds"), "--labels", str(labels)]) == 2
    assert f"videotuna: error: {labels}: malformed JSON" in capsys.readouterr().err
    assert main(["pairs", "--scores", str(tmp_path / "scores.jsonl"), "--out", str(tmp_path / "ds"),
                 "--labels", str(tmp_path / "nope.json")]) == 2
    assert f"videotuna: error: --labels {tmp_path / 'nope.json'}: file not found" in capsys.readouterr().err


def test_every_pair_dropped_is_refused(tmp_path):
    _scores(tmp_path)
    labels = _labels(tmp_path, [("a_1", "a_2", "tie"), ("b_3", "b_4", "tie"), ("c_5", "c_6", "tie"),
                                ("e_10", "e_11", "reject", ["winner", "loser"]), ("d_7", "d_9", "reject", ["winner", "loser"])])
    _refused(tmp_path, labels, re.escape(f"--labels {labels}: every pair of {tmp_path / 'scores.jsonl'} is dropped"))


def test_a_reject_wins_over_another_label_of_a_pair_of_the_broken_video(tmp_path):
    _scores(tmp_path)
    labels = _labels(tmp_path, [("d_9", "d_7", "reject", ["winner"]), ("d_9", "d_8", "keep")])
    build_pairs_dataset(tmp_path / "scores.jsonl", tmp_path / "ds", strategy="all-gap", plots=False, labels=labels)
    report = _manifest(tmp_path / "ds")["labels"]
    assert (report["dropped_reject"], report["confirmed"], report["not_applied"]) == (2, 0, [])
    assert _named(_manifest(tmp_path / "ds")) == [("a_2", "a_1", "scorer"), ("b_4", "b_3", "scorer"),
                                                  ("c_6", "c_5", "scorer"), ("d_8", "d_7", "scorer"),
                                                  ("e_11", "e_10", "scorer")]
