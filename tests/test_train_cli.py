import csv
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, make_backend

CONFIG = ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"


def _train(tiny_cogvideox, tiny_dataset, out, *extra):
    cmd = [sys.executable, "-m", "videotuna_dpo", "train", "--strategy", "dpo", "--config", str(CONFIG),
           f"model.pretrained={tiny_cogvideox}", f"data.train_data={tiny_dataset}", f"output_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _metrics(out):
    rows = []
    for path in sorted((out / "logs").glob("version_*/metrics.csv")):
        with path.open() as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/loss")]
    return rows


def test_train_from_cli_checkpoints_resumes_and_weights_generate(tiny_cogvideox, tiny_dataset, tmp_path):
    out = tmp_path / "run"
    proc = _train(tiny_cogvideox, tiny_dataset, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["global_step"] == 6
    for name in ("step-3.ckpt", "step-6.ckpt", "last.ckpt"):
        assert (out / "checkpoints" / name).is_file()
    # Checkpoints hold the trainable (LoRA) tensors only, never the frozen model.
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in k for k in state)
    lora = load_file(out / "weights" / "last" / "pytorch_lora_weights.safetensors")
    assert len(lora) == len(state)
    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(6))
    for key in ("train/implicit_acc", "train/reward_margin", "train/model_err_w", "train/ref_err_l", "train/lr"):
        assert rows[-1][key] != ""
    assert float(rows[0]["train/lr"]) == pytest.approx(1e-3)

    resumed = _train(tiny_cogvideox, tiny_dataset, out, "lightning.trainer.max_steps=9", "--resume", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    assert json.loads((out / "run.json").read_text())["global_step"] == 9
    assert [int(r["step"]) for r in _metrics(out)] == list(range(9))  # continued at step 6, not 0

    backend = make_backend(tiny_cogvideox, lora={"rank": 8, "alpha": 8}, trainable_weights=str(out / "weights" / "last"))
    video = backend.generate(["a red square moving right"], num_frames=9, steps=2, guidance=1.0, seed=0)
    assert video.shape == (1, 9, 3, 32, 32)


def test_cli_reports_a_mistyped_key_with_its_dotted_path(tiny_cogvideox, tiny_dataset, tmp_path):
    proc = _train(tiny_cogvideox, tiny_dataset, tmp_path / "r", "dpo.betta=10")
    assert proc.returncode == 2
    assert "unknown key 'dpo.betta'. Did you mean 'dpo.beta'?" in proc.stderr
    proc = _train(tiny_cogvideox, tiny_dataset, tmp_path / "r", "model.lora.rnak=2")
    assert "unknown key 'model.lora.rnak'. Did you mean 'model.lora.rank'?" in proc.stderr
    proc = _train(tiny_cogvideox, tiny_dataset, tmp_path / "r", "lightning.trainer.max_step=2")
    assert "unknown key 'lightning.trainer.max_step'. Did you mean 'lightning.trainer.max_steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_reports_bad_data_before_training(tiny_cogvideox, tmp_path):
    from tests.datasets import write_official_dataset

    ds = write_official_dataset(tmp_path / "ds", ["a red square moving right"])
    (ds.parent / "part0" / "pair.json").write_text(json.dumps([{"video1": 0, "video2": 5, "frame_caption": "x"}]))
    proc = _train(tiny_cogvideox, ds, tmp_path / "r")
    assert proc.returncode == 2
    assert "pair.json row 0: video2=5 out of range (metadata.json has 2 entries)" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize("override,message", [
    ("dpo.beta=-5", "bad value for 'dpo.beta': -5.0 (expected a finite number > 0)"),
    ("dpo.beta=nan", "bad value for 'dpo.beta': nan (expected a finite number > 0)"),
    ("optimizer.lr=-1", "bad value for 'optimizer.lr': -1.0 (expected a finite number > 0)"),
    ("data.video_length=0", "bad value for 'data.video_length': 0 (expected an integer >= 1)"),
    ("data.frame_stride=0", "bad value for 'data.frame_stride': 0 (expected an integer >= 1)"),
    ("lightning.trainer.max_steps=lots", "bad value for 'lightning.trainer.max_steps': 'lots' (expected an integer)"),
    ("dpo.loss_type=hinj", "bad value for 'dpo.loss_type': 'hinj' (expected one of sigmoid, hinge, ipo)"),
    ("optimizer.name=adam", "bad value for 'optimizer.name': 'adam' (expected one of adamw, adamw_8bit)"),
    ("dpo.reference_draws=0", "bad value for 'dpo.reference_draws': 0 (expected an integer >= 1)"),
])
def test_bad_values_are_refused_by_key_before_any_model_loads(tmp_path, capsys, override, message):
    from videotuna_dpo.cli import main

    # model.pretrained points nowhere: reaching the model would fail with another message.
    code = main(["train", "--strategy", "dpo", "--config", str(CONFIG), f"model.pretrained={tmp_path / 'nowhere'}",
                 f"data.train_data={tmp_path / 'nowhere.yaml'}", f"output_dir={tmp_path / 'run'}", override])
    assert code == 2
    assert message in capsys.readouterr().err


def test_8bit_adamw_without_bitsandbytes_is_refused_naming_the_package_before_any_model_loads(tmp_path, capsys,
                                                                                               monkeypatch):
    from videotuna_dpo.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed (importing it raises ImportError)
    code = main(["train", "--strategy", "dpo", "--config", str(CONFIG), f"model.pretrained={tmp_path / 'nowhere'}",
                 f"data.train_data={tmp_path / 'nowhere.yaml'}", f"output_dir={tmp_path / 'run'}",
                 "optimizer.name=adamw_8bit"])
    err = capsys.readouterr().err
    assert code == 2
    assert "videotuna: error: optimizer.name=adamw_8bit needs the bitsandbytes package, which is not importable (" in err
    assert "pip install bitsandbytes (8-bit optimizers run on a CUDA GPU), or set optimizer.name=adamw" in err


@pytest.mark.parametrize("samples", [0, -2])
def test_generate_refuses_a_non_positive_sample_count(tmp_path, capsys, samples):
    from videotuna_dpo.cli import main

    (tmp_path / "p.txt").write_text("a red square\n")
    code = main(["generate", "--config", str(CONFIG), "--prompts", str(tmp_path / "p.txt"), "--num-samples",
                 str(samples), "--out", str(tmp_path / "out"), f"model.pretrained={tmp_path / 'nowhere'}"])
    assert code == 2 and f"--num-samples must be >= 1, got {samples}" in capsys.readouterr().err


def test_a_run_resumed_mid_epoch_ends_bit_identical_to_the_uninterrupted_run(tiny_cogvideox, tiny_dataset, tmp_path):
    import shutil

    # Everything random is on: shuffled pairs, random clip starts, caption dropout, LoRA dropout.
    extra = ["lightning.trainer.max_steps=6", "lightning.checkpoint.every_n_train_steps=3", "data.batch_size=1",
             "data.video_length=5", "data.frame_start=random", "dpo.uncond_prob=0.5", "dpo.disable_dropout=false",
             "model.lora.dropout=0.1"]
    whole = tmp_path / "whole"
    assert _train(tiny_cogvideox, tiny_dataset, whole, *extra).returncode == 0
    # A run killed after step 3 (2 pairs, batch 1: in the middle of the second epoch) leaves that checkpoint.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step-3.ckpt", resumed / "checkpoints" / "last.ckpt")
    proc = _train(tiny_cogvideox, tiny_dataset, resumed, *extra, "--resume", "last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = {int(r["step"]): float(r["train/loss"]) for r in _metrics(whole)}
    again = {int(r["step"]): float(r["train/loss"]) for r in _metrics(resumed)}
    assert sorted(again) == [3, 4, 5] and all(again[s] == losses[s] for s in again), (losses, again)
    a = load_file(whole / "weights" / "last" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "weights" / "last" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
