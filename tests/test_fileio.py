"""File I/O: atomic writes (all-or-nothing, no temporaries left, ordinary permissions); unreadable weight files."""

import os
import stat

import pytest
import torch

from videotuna_dpo.data.video_io import write_video
from videotuna_dpo.fileio import atomic_file, write_json_atomic
from videotuna_dpo.models.base import atomic_directory


def test_written_files_get_umask_permissions_not_mkstemps_0600(tmp_path, umask_022):
    json_path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    video = write_video(tmp_path / "v.mp4", torch.zeros(2, 3, 8, 8), lossless=True)
    for path in (json_path, video):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "scores.json"
    write_json_atomic(target, {"old": True})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(target) as tmp, open(tmp, "w") as f:
            f.write('{"new": ')
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n "old": true\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]
    with pytest.raises(ValueError):  # NaN is refused before anything is replaced
        write_json_atomic(target, {"x": float("nan")})
    assert target.read_text() == '{\n "old": true\n}'


@pytest.mark.parametrize("failure", [RuntimeError("out of memory"), KeyboardInterrupt()])
def test_a_failure_inside_write_leaves_the_previous_weights_folder_intact(tmp_path, failure):
    target = tmp_path / "weights" / "last"
    atomic_directory(target, lambda d: (d / "lora.safetensors").write_bytes(b"step 1"), {"step": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def write(directory):
        (directory / "lora.safetensors").write_bytes(b"step 2, half wr")
        (directory / "extra.bin").write_bytes(b"x")
        raise failure

    with pytest.raises(type(failure)):
        atomic_directory(target, write, {"step": 2})
    assert before == {"lora.safetensors": b"step 1", "trainable.json": b'{\n  "step": 1\n}'}
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_exported_weights_get_umask_permissions_not_mkdtemps_0700(tiny_cogvideox, tmp_path, umask_022, finetune):
    from tests.conftest import make_backend

    saved = make_backend(tiny_cogvideox, finetune=finetune).save_trainable(tmp_path / "weights" / "last")
    modes = {str(p.relative_to(saved)): stat.S_IMODE(p.stat().st_mode) for p in saved.rglob("*")}
    assert stat.S_IMODE(saved.stat().st_mode) == 0o755
    assert "trainable.json" in modes and any(name.endswith(".safetensors") for name in modes)
    assert modes == {name: 0o755 if (saved / name).is_dir() else 0o644 for name in modes}


def test_unreadable_weight_files_are_named_whatever_their_format(tmp_path):
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.checkpoint_io import load_weights

    for name in ("broken.safetensors", "broken.pth"):
        (tmp_path / name).write_bytes(b"xx")
        with pytest.raises(UserError, match=rf"{name.replace('.', '[.]')}: not a readable checkpoint"):
            load_weights(tmp_path / name, "model.trust_checkpoint")


class _Scripted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(2, 3)
        self.register_buffer("scale", torch.tensor([4.0]))
        self.steps = 7  # an int attribute: not a tensor, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


def test_torchscript_tensors_are_read_under_their_state_dict_names(tmp_path):
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.checkpoint_io import load_torchscript_tensors

    module = torch.jit.script(_Scripted())
    module.save(str(tmp_path / "scripted.pt"))
    tensors = load_torchscript_tensors(tmp_path / "scripted.pt")
    assert sorted(tensors) == sorted(module.state_dict()) == ["proj.bias", "proj.weight", "scale"]
    assert all(torch.equal(tensors[k], v) for k, v in module.state_dict().items())
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")  # a zip, but no TorchScript pickle of modules
    with pytest.raises(UserError, match=r"plain\.pt: the TorchScript archive holds a dict, not a module"):
        load_torchscript_tensors(tmp_path / "plain.pt")
    (tmp_path / "broken.pt").write_bytes(b"xx")
    with pytest.raises(UserError, match=r"broken\.pt: not a readable TorchScript archive"):
        load_torchscript_tensors(tmp_path / "broken.pt")
