import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_distribution
from videotuna_dpo.registry import PluginError, Registry


def test_builtin_plugin_registers_dpo_strategy_and_cogvideox_backend():
    registry = Registry.load()
    entry = registry.entry("strategy", "dpo")
    assert entry.plugin == "dpo"
    assert entry.distribution.startswith("videotuna-dpo")
    assert "cogvideox" in registry.names("model")
    assert "preference" in registry.names("datamodule")
    # String references resolve to the real classes on lookup.
    from videotuna_dpo.strategy import DPOStrategy

    assert registry.get("strategy", "dpo") is DPOStrategy


def test_example_scorer_is_discovered_through_entry_points(example_scorer_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_scorer_site))
    registry = Registry.load()
    entry = registry.entry("scorer", "example_brightness")
    assert entry.plugin == "example_scorer"
    assert entry.distribution == "videotuna-example-scorer"
    assert entry.version == "0.1.0"
    scorer = registry.create("scorer", "example_brightness")
    videos = torch.zeros(2, 3, 3, 4, 4)
    videos[1] = 0.25
    assert scorer.kind == "quality" and scorer.needs_weights is False
    assert torch.allclose(scorer(videos, ["a", "b"]), torch.tensor([0.0, 0.25]))


def test_same_name_from_two_plugins_is_an_error_naming_both_distributions(tmp_path, monkeypatch):
    plugin_src = """
        import pluggy
        hookimpl = pluggy.HookimplMarker("videotuna")
        @hookimpl
        def videotuna_scorers():
            return {"sharpness": object}
    """
    make_distribution(tmp_path, "alpha-scorers", {"alpha": "alpha_plugin"}, {"alpha_plugin": plugin_src})
    make_distribution(tmp_path, "beta-scorers", {"beta": "beta_plugin"}, {"beta_plugin": plugin_src})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as info:
        Registry.load()
    message = str(info.value)
    assert "'sharpness'" in message
    assert "alpha-scorers" in message and "beta-scorers" in message
    # Enabling only one of them resolves the collision.
    registry = Registry.load(["dpo", "beta"])
    assert registry.entry("scorer", "sharpness").distribution == "beta-scorers"


def test_unknown_strategy_lists_installed_strategies():
    registry = Registry.load()
    with pytest.raises(PluginError, match=r"unknown strategy 'dpp'; installed strategy names: dpo"):
        registry.get("strategy", "dpp")


def test_plugins_filter_uses_only_listed_plugins(example_scorer_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_scorer_site))
    assert "example_brightness" in Registry.load().names("scorer")
    only_dpo = Registry.load(["dpo"])
    assert "example_brightness" not in only_dpo.names("scorer")
    assert only_dpo.names("strategy") == ["dpo"]
    only_example = Registry.load(["example_scorer"])
    assert only_example.names("scorer") == ["example_brightness"]
    assert only_example.names("strategy") == []


def test_unknown_plugin_in_filter_lists_installed_plugins(example_scorer_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_scorer_site))
    with pytest.raises(PluginError) as info:
        Registry.load(["dpo", "exmple_scorer"])
    assert "'exmple_scorer' not installed" in str(info.value)
    assert "dpo, example_scorer" in str(info.value)


def test_broken_plugin_error_names_the_problem(tmp_path, monkeypatch):
    make_distribution(tmp_path, "broken-dist", {"broken": "broken_plugin"}, {"broken_plugin": "import nonexistent_mod_xyz\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="nonexistent_mod_xyz"):
        Registry.load()


def _cli(args, extra_path=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "videotuna_dpo", *args], capture_output=True, text=True, env=env)


def test_cli_plugins_lists_builtin_and_example(example_scorer_site):
    proc = _cli(["plugins", "--json"], example_scorer_site)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_name = {(r["kind"], r["name"]): r for r in rows}
    assert by_name[("strategy", "dpo")]["distribution"].startswith("videotuna-dpo")
    assert by_name[("scorer", "example_brightness")]["distribution"] == "videotuna-example-scorer"
    assert by_name[("scorer", "example_brightness")]["version"] == "0.1.0"
    table = _cli(["plugins"], example_scorer_site)
    assert table.returncode == 0
    header = table.stdout.splitlines()[0].split()
    assert header == ["kind", "name", "plugin", "distribution", "version"]
    assert any(line.split()[:2] == ["scorer", "example_brightness"] for line in table.stdout.splitlines())


def test_cli_output_into_a_closed_pipe_stops_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as `videotuna plugins --json | head` can be
    try:
        proc = subprocess.run([sys.executable, "-m", "videotuna_dpo", "plugins", "--json"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_cli_train_unknown_strategy_is_a_clean_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: cogvideox}\n")
    proc = _cli(["train", "--strategy", "nope", "--config", str(cfg)])
    assert proc.returncode == 2
    assert "unknown strategy 'nope'; installed strategy names: dpo" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_of_each_verb_has_an_example():
    for verb in ["plugins", "train", "generate", "score", "pairs", "cache", "demo"]:
        proc = _cli([verb, "--help"])
        assert proc.returncode == 0
        assert "example: videotuna " + verb in proc.stdout
