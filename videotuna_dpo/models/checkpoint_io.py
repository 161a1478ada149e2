"""Reading weights without running pickled code unless the config explicitly trusts the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from videotuna_dpo.errors import UserError


class UntrustedCheckpointError(UserError):
    """A checkpoint needs full unpickling and the config does not trust it."""


def load_weights(path: str | Path, trust_switch: str, trusted: bool = False) -> Any:
    """Load safetensors, or a torch file with ``weights_only=True``.

    A file that needs full unpickling is refused, naming the file and the config key
    (``trust_switch``) that allows it; with ``trusted=True`` it is unpickled fully.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError (or RuntimeError) with weights_only
        if not trusted:
            raise UntrustedCheckpointError(
                f"{path}: this checkpoint holds pickled Python objects beyond tensors, and loading it "
                f"would run arbitrary code ({type(exc).__name__}). If you trust the file, set "
                f"`{trust_switch}=true` in the config (or on the command line)."
            ) from exc
        return torch.load(path, map_location="cpu", weights_only=False)
