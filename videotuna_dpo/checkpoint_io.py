"""Reading the weights of models and scorers without running pickled code unless the config trusts the file."""

from __future__ import annotations

import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from videotuna_dpo.errors import UserError, first_line


class UntrustedCheckpointError(UserError):
    """A checkpoint needs full unpickling and the config does not trust it."""


def load_weights(path: str | Path, trust_switch: str, trusted: bool = False, how_to_trust: str | None = None) -> Any:
    """Load safetensors, or a torch file with ``weights_only=True``.

    A file that needs full unpickling is refused, naming the file and how to allow it (the config key
    ``trust_switch``, or ``how_to_trust`` when given); with ``trusted=True`` it is unpickled fully.
    A file that is not a readable checkpoint at all is a :class:`UserError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler refused a GLOBAL: an object ("can still be loaded"), or a call such as
        # os.system ("unsupported GLOBAL ... is blocked"). Any other unpickling error: not a checkpoint at all.
        if "GLOBAL" not in str(exc) and "can still be loaded" not in str(exc):
            raise UserError(f"{path}: not a readable checkpoint ({first_line(exc)})") from None
        if not trusted:
            how = how_to_trust or f"set `{trust_switch}=true` in the config (or on the command line)"
            raise UntrustedCheckpointError(
                f"{path}: this checkpoint holds pickled Python objects beyond tensors, and loading it "
                f"would run arbitrary code. If you trust the file, {how}."
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:  # truncated zip, bad header, ...
        raise UserError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {first_line(exc)})") from None


class _ScriptObject:
    """Stands in for a TorchScript class while its archive is read: keeps the pickled attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        # A class whose own __setstate__ (code in the archive's code/) rebuilds it keeps no plain attributes.
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.script_class} restores itself with its own __setstate__ "
                                         f"(code in the archive, not run here) instead of holding plain weights")
        self.attributes = state


def load_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's modules by dotted name (a traced module's state dict).

    Read from ``data.pkl`` and ``data/`` with torch's weights-only unpickler: the archive's ``code/`` never runs.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next((archive.read(n) for n in archive.namelist()
                            if n.endswith("/data.pkl") and n.count("/") == 1), None)  # <archive name>/data.pkl
        if pickled is None:
            raise UserError(f"{path}: not a TorchScript archive (no data.pkl)")
        names = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(pickled)
                 if op.name == "GLOBAL" and arg.startswith("__torch__")}
        stand_ins = [(type(name, (_ScriptObject,), {"script_class": name}), name) for name in names]
        # torch.load would hand a TorchScript zip to torch.jit.load; its weights-only reader is called directly
        # (torch.serialization._load with weights_only, and (class, name) safe globals: torch >= 2.6).
        with torch.serialization.safe_globals(stand_ins), torch.serialization._open_zipfile_reader(str(path)) as reader:
            root = torch.serialization._load(reader, "cpu", torch._weights_only_unpickler, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable TorchScript archive "
                        f"({type(exc).__name__}: {first_line(exc, limit=400)})") from None
    if not isinstance(root, _ScriptObject):
        raise UserError(f"{path}: the TorchScript archive holds a {type(root).__name__}, not a module")
    return dict(_named_tensors(root, "", ()))


def _named_tensors(obj: _ScriptObject, prefix: str, parents: tuple[int, ...]) -> Iterator[tuple[str, torch.Tensor]]:
    parents = (*parents, id(obj))
    for name, value in getattr(obj, "attributes", {}).items():
        if isinstance(value, torch.Tensor):
            yield prefix + name, value
        elif isinstance(value, _ScriptObject) and id(value) not in parents:  # a crafted cycle ends here
            yield from _named_tensors(value, f"{prefix}{name}.", parents)
