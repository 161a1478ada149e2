"""User YAML and JSON go through one bounded reader: alias bombs and oversized files are refused by name."""

import json
import re

import pytest

from videotuna_dpo import user_files
from videotuna_dpo.config import ConfigError, load_config
from videotuna_dpo.data.preference import DataError, load_pairs
from videotuna_dpo.errors import UserError
from videotuna_dpo.data.scores import read_scores
from videotuna_dpo.user_files import read_json, read_yaml

# Nine levels of nine aliases each: 9**9 (387 million) strings once expanded.
BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{below}'] * 9)}]\n" for below, name in zip("abcdefgh", "bcdefghi"))


def test_a_billion_laughs_train_data_yaml_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.delenv("OMEGACONF_MAX_YAML_EXPANDED_NODES", raising=False)
    train_data = tmp_path / "train_data.yaml"
    train_data.write_text(BILLION_LAUGHS + "META: [*i]\n")
    refusal = rf"{re.escape(str(train_data))}: malformed YAML \(YAML node expansion exceeds the configured limit of 10000"
    with pytest.raises(DataError, match=refusal):
        load_pairs(train_data)
    with pytest.raises(ConfigError, match=refusal):  # the same file as a config: the same reader, the same refusal
        load_config(train_data)


def test_an_oversized_data_file_is_refused_naming_it(tmp_path, monkeypatch):
    part = tmp_path / "part0"
    part.mkdir()
    (part / "metadata.json").write_text("[]")
    (part / "pair.json").write_text(json.dumps([{"video1": 0, "video2": 1, "frame_caption": "x" * 2000}]))
    (tmp_path / "train_data.yaml").write_text("META: [part0]\n")
    monkeypatch.setitem(user_files.MAX_BYTES, "json", 1000)
    with pytest.raises(DataError, match=rf"{re.escape(str(part / 'pair.json'))}: larger than the 1,000 bytes "
                                        r"accepted for a json file"):
        load_pairs(tmp_path / "train_data.yaml")
    monkeypatch.setitem(user_files.MAX_BYTES, "yaml", 10)
    with pytest.raises(DataError, match=r"train_data\.yaml: larger than the 10 bytes accepted for a yaml file"):
        load_pairs(tmp_path / "train_data.yaml")
    scores = tmp_path / "scores.jsonl"
    scores.write_text('{"path": "a.mp4", "status": "ok"}\n')
    monkeypatch.setitem(user_files.MAX_BYTES, "lines", 10)
    with pytest.raises(UserError, match=r"scores\.jsonl: larger than the 10 bytes accepted for a lines file"):
        read_scores(scores)


def test_deeply_nested_json_is_refused_naming_it(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match=r"manifest\.json: malformed JSON \(maximum recursion depth exceeded"):
        read_json(path)


def test_ordinary_yaml_and_json_read_as_plain_values(tmp_path):
    (tmp_path / "train_data.yaml").write_text("META: [part0, 2024-01-01]\nlr: 1e-5\nbase: &b {a: 1}\nsame: *b\n")
    # Dates stay strings (a dir may be named by one); 1e-5 is a float, as in configs.
    assert read_yaml(tmp_path / "train_data.yaml") == {
        "META": ["part0", "2024-01-01"], "lr": 1e-5, "base": {"a": 1}, "same": {"a": 1}}
    (tmp_path / "pair.json").write_text('[{"video1": 0, "video2": 1, "score": 0.5, "frame_caption": null}]')
    assert read_json(tmp_path / "pair.json") == [{"video1": 0, "video2": 1, "score": 0.5, "frame_caption": None}]
    with pytest.raises(UserError, match=r"missing\.json: cannot read \(No such file or directory\)"):
        read_json(tmp_path / "missing.json")
