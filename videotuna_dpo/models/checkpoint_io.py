"""Reading weights without running pickled code unless the config explicitly trusts the file."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

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
        if "can still be loaded" not in str(exc):  # torch's wording when only non-tensor objects are in the way
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
