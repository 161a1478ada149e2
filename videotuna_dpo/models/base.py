"""The backend protocol the DPO strategy trains through; it never knows which family it trains."""

from __future__ import annotations

import json
import pickle
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError

from videotuna_dpo import fileio
from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.user_files import read_json

# predict(noisy [B, ...latent], t [B], cond) -> prediction shaped like noisy
PredictFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@runtime_checkable
class Backend(Protocol):
    """What a model family provides (see ``hookspecs.videotuna_models``). Latent layouts are the family's own.

    A backend is also a ``torch.nn.Module``: the host moves it (``.to``), switches it to ``.eval()`` for
    sampling, disables its dropout through ``.modules()`` and checkpoints its trainable tensors by name.
    """

    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, C, F, H, W]`` in [-1, 1] -> latents (the family's layout)."""

    def encode_prompt(self, prompts: list[str]) -> Any:
        """B captions -> the conditioning ``predict`` takes: a tensor ``[B, ...]`` (the strategy concatenates two along
        dim 0; ``dpo.uncond_prob`` needs this form) or a list of B items (concatenated with ``+``)."""

    def sample_timesteps(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``n`` training timesteps ``[n]`` on ``device``, drawn from torch's global generator as the family trains."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) with the family's schedule (and input scaling)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of ``predict``: eps, v or flow velocity."""

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The policy's prediction, shaped like ``noisy`` (gradients flow into the trainable parameters).

        ``noisy`` ``[2B, ...]`` holds the winners then the losers, ``t`` ``[2B]``, ``cond`` both halves'
        conditioning."""

    def reference(self) -> AbstractContextManager[PredictFn]:
        """Context yielding the frozen reference model's ``predict(noisy, t, cond)``; entered under ``torch.no_grad()``.
        At the first step, before any update, it must equal ``predict`` (the first DPO loss is then log 2)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Exactly the parameters the optimizer updates."""

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the trainable weights atomically to ``directory`` (created) and return it; it must hold a
        ``trainable.json`` (a JSON object), by which ``videotuna eval --weights`` knows a weights directory:
        :func:`atomic_directory` writes both. The host writes ``weights/step-N`` and ``weights/last`` with it."""

    def load_trainable(self, directory: str | Path) -> None:
        """Load what ``save_trainable`` wrote (``model.trainable_weights``, ``generate --weights``)."""

    def generate(self, prompts: list[str], num_frames: int, steps: int, guidance: float, seed: list[int],
                 **kwargs: Any) -> torch.Tensor:
        """Sample videos: float ``[B, F, C, H, W]`` in [0, 1], B = len(prompts); video i from ``seed[i]`` alone,
        whatever its batch. Called with keywords; ``kwargs``: ``height``, ``width``, ``negative_prompt`` and
        ``guidance_2``, each only when the config's ``generate:`` block sets it."""


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


SAVE_AS_SAFETENSORS = ("save the weights as safetensors (save_pretrained(..., safe_serialization=True) or "
                       "safetensors.torch.save_file)")


def _pickled_note(folder: Path, read_bin: bool) -> str:
    """What to say about a pickled ``.bin`` in ``folder`` (nothing when there is none)."""
    bins = sorted(folder.glob("*.bin")) if folder.is_dir() else []
    if not bins:
        return ""
    if read_bin:
        return (f"; {bins[0]} is a pickled file, loaded only if it holds nothing but tensors (torch.load "
                f"weights_only), since unpickling anything else can run code: {SAVE_AS_SAFETENSORS}")
    return (f"; it holds {bins[0]}, a pickled file, which a weights folder never loads (unpickling can run code): "
            f"{SAVE_AS_SAFETENSORS}")


@contextmanager
def named_load_errors(folder: str | Path, key: str, read_bin: bool = True) -> Iterator[None]:
    """Turn a ``from_pretrained`` failure on ``folder`` into a UserError naming the config key, the folder and its
    pickled ``.bin`` if any. ``read_bin``: whether the load may read a ``.bin`` (false with ``use_safetensors=True``)."""
    folder = Path(folder)
    try:
        yield
    except (OSError, ValueError, pickle.UnpicklingError) as exc:  # diffusers: OSError/ValueError; transformers: unpickling
        why = "it holds pickled objects beyond tensors" if isinstance(exc, pickle.UnpicklingError) else first_line(exc)
        raise UserError(f"{key}: cannot load the weights in {folder} ({why}){_pickled_note(folder, read_bin)}") from None


def read_safetensors(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``directory/name`` in a weights folder; missing or unreadable is a UserError naming the file."""
    from safetensors.torch import load_file

    path = Path(directory) / name
    if not path.is_file():
        note = _pickled_note(path.parent, read_bin=False) or "; point at a run's weights/last or weights/step-N folder"
        raise UserError(f"{directory}: no {name}{note}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                      fix: str = "give the weights of a run on the same base model") -> None:
    """``load_state_dict(strict=True)`` whose error names ``what`` (the file), the first bad keys and ``fix``."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{what}: does not match {type(module).__name__} (missing {list(result.missing_keys)[:3]}, "
                        f"unexpected {list(result.unexpected_keys)[:3]}); {fix}")
