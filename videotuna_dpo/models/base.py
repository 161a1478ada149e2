"""The backend protocol the DPO strategy trains through; it never knows which family it trains."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from videotuna_dpo import fileio

# predict(noisy [B, ...latent], t [B], cond) -> prediction shaped like noisy
PredictFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """What a model family provides. Latent layouts are the family's own; shapes are per method."""

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` in [-1, 1] -> latents (the family's layout)."""

    def encode_prompt(self, prompts: list[str]) -> Any:
        """Captions -> the conditioning ``predict`` takes."""

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``n`` training timesteps ``[n]`` drawn as the family trains."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) with the family's schedule (and input scaling)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of ``predict``: eps, v or flow velocity."""

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The policy's prediction (gradients flow into the trainable parameters)."""

    def reference(self) -> AbstractContextManager[PredictFn]:
        """Context yielding the frozen reference model's ``predict``."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the parameters the optimizer updates."""

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the trainable weights (safetensors) atomically to ``directory``."""

    def load_trainable(self, directory: str | Path) -> None:
        """Load what ``save_trainable`` wrote."""

    def generate(self, prompts: list[str], num_frames: int, steps: int, guidance: float, seed: int | list[int],
                 **kwargs: Any) -> torch.Tensor:
        """Sample videos: float ``[B, F, C, H, W]`` in [0, 1]; ``seed`` a list gives video i seed[i], whatever its batch."""


TRAINABLE_META = "trainable.json"


def seed_list(seed: int | list[int], n: int) -> list[int]:
    """One seed per prompt: a list as given (its length checked), an int ``s`` as ``s, s+1, ..., s+n-1``."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for {n} prompts")
        return [int(s) for s in seed]
    return [int(seed) + i for i in range(n)]


def atomic_directory(target: str | Path, write: Callable[[Path], None], meta: dict) -> Path:
    """Run ``write(tmpdir)``, add ``trainable.json``, swap ``tmpdir`` into ``target``: readers never see half a save."""
    with fileio.atomic_directory(target) as tmp:
        write(tmp)
        (tmp / TRAINABLE_META).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Path(target)


def init_weights_id(cfg: Any) -> str | None:
    """``model.init_weights`` as recorded with trained weights (absolute), None when unset."""
    value = getattr(cfg, "init_weights", None)
    return str(Path(value).resolve()) if value else None


def read_trainable_meta(directory: str | Path, family: str | None = None, cfg: Any = None) -> dict:
    """``trainable.json`` of a weights folder; with ``family``/``cfg``, checks that the weights fit.

    Family, ``finetune`` (lora/full) and LoRA rank must match ``cfg``; a mismatch names what to set.
    """
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.user_files import read_json

    path = Path(directory) / TRAINABLE_META
    if not path.is_file():
        raise UserError(
            f"{directory}: not a trainable-weights directory ({TRAINABLE_META} missing); point at a "
            f"run's weights/last or weights/step-N folder"
        )
    meta = read_json(path)
    if family is not None and meta.get("family") != family:
        raise UserError(f"{directory}: weights of model family {meta.get('family')!r}, not {family!r}; set model.name")
    if cfg is not None and meta.get("init_weights", None) != init_weights_id(cfg):
        raise UserError(f"{directory}: trained on top of model.init_weights={meta.get('init_weights')}, but this "
                        f"config has model.init_weights={init_weights_id(cfg)}; set it to the weights it was trained on")
    if cfg is not None and hasattr(cfg, "finetune"):
        if meta.get("finetune") != cfg.finetune:
            raise UserError(f"{directory}: holds {meta.get('finetune')!r} weights but model.finetune is "
                            f"{cfg.finetune!r}; set model.finetune={meta.get('finetune')}")
        lora = meta.get("lora") or {}
        if cfg.finetune == "lora" and lora and int(lora["rank"]) != cfg.lora.rank:
            raise UserError(f"{directory}: LoRA rank {lora['rank']} but model.lora.rank={cfg.lora.rank}")
    return meta
