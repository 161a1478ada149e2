"""The scorer contract: videos ``[B, F, C, H, W]`` in [0, 1] plus prompts -> ``[B]`` raw scores.

Weights of model-based scorers come from an explicit path (a scorer option, i.e. a config key) or
from one directory named by the environment variable ``VIDEOTUNA_WEIGHTS``. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch

from videotuna_dpo.checkpoint_io import load_weights
from videotuna_dpo.errors import UserError

WEIGHTS_ENV = "VIDEOTUNA_WEIGHTS"


class MissingWeightsError(UserError):
    """A scorer's weights file is not where it looked; the message says what to put there."""


@runtime_checkable
class Scorer(Protocol):
    """What ``videotuna score`` needs from a scorer registered under the hook ``videotuna_scorers``."""

    kind: str  # "quality" or "semantic"
    needs_weights: bool
    weights_hint: str  # where it looks for weights, "" when it needs none
    version: str

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Float ``[B, F, C, H, W]`` in [0, 1] and B prompts -> float ``[B]`` raw scores."""
        ...


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class BaseScorer:
    """Checks the input contract, runs without gradients and reports its weights.

    Subclasses set ``name``, ``kind``, ``version``, ``min_frames`` and implement ``score``.
    """

    name = "base"
    kind = "quality"
    needs_weights = False
    weights_hint = ""
    version = "0"
    min_frames = 1
    min_side = 0  # frames with a shorter side are unscorable
    min_side_why = ""  # said after the size in the reason
    uses_fps = False  # True: score() takes fps=, the frame rate of the batch's files (None if unknown)
    uses_shared = False  # True: score() takes shared=, the batch's SharedFrames (8-bit frames, resized frames, flow)

    def __init__(self, device: str | None = None):
        self.device = torch.device(device or default_device())
        self.weights_used: dict[str, str] = {}

    def unscorable(self, num_frames: int, height: int, width: int) -> str | None:
        """Why a video of this size cannot be scored (``videotuna score`` records it as failed), else None."""
        if num_frames < self.min_frames:
            return f"needs at least {self.min_frames} frames, got {num_frames}"
        if min(height, width) < self.min_side:
            return f"needs frames of at least {self.min_side} px a side, got {height}x{width}{self.min_side_why}"
        return None

    def score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement score(videos, prompts)")

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float | None = None,
                 shared=None) -> torch.Tensor:
        """Check the contract and score; ``fps`` (the files' frame rate) reaches scorers with ``uses_fps``,
        ``shared`` (a :class:`~videotuna_dpo.scoring.shared_frames.SharedFrames` of ``videos``, or None) scorers
        with ``uses_shared``."""
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(f"{self.name}: videos must be [B, F, 3, H, W], got shape {tuple(videos.shape)}")
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{self.name}: {videos.shape[0]} videos but {len(prompts)} prompts")
        problem = self.unscorable(videos.shape[1], videos.shape[-2], videos.shape[-1])
        if problem:
            raise ValueError(f"{self.name}: {problem}")
        extra = {"fps": fps} if self.uses_fps else {}
        if self.uses_shared:
            if shared is not None and shared.videos is not videos:
                raise ValueError(f"{self.name}: shared frames of another batch: SharedFrames(videos) must be given "
                                 f"the very tensor the scorer is called with")
            extra["shared"] = shared  # None: score() makes its own
        scores = self.score(videos.to(self.device, torch.float32), list(prompts), **extra)
        return scores.detach().double().cpu().reshape(videos.shape[0])

    def describe(self) -> dict:
        """The record written next to every score: version and the weight files actually used."""
        return {"version": self.version, "weights": dict(self.weights_used) or None}


def find_weights(scorer: str, explicit: str | os.PathLike | None, relative: str, what: str, option: str) -> Path:
    """Resolve a weights file: ``explicit`` if given, else ``$VIDEOTUNA_WEIGHTS/relative``.

    Raises :class:`MissingWeightsError` naming the scorer, the file looked for and what belongs there.
    """
    how = (
        f"Put {what} there, or point the scorer option `{option}` at the file "
        f"(videotuna score --option {scorer}.{option}=PATH)."
    )
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file():
            return path
        raise MissingWeightsError(f"{scorer}: weights file {path} (option `{option}`) not found. {how}")
    root = os.environ.get(WEIGHTS_ENV)
    if not root:
        raise MissingWeightsError(
            f"{scorer}: needs {relative} in the weights directory, but ${WEIGHTS_ENV} is not set. "
            f"Set {WEIGHTS_ENV}=DIR with DIR/{relative}. {how}"
        )
    path = Path(root).expanduser() / relative
    if not path.is_file():
        raise MissingWeightsError(f"{scorer}: weights file {path} (${WEIGHTS_ENV}/{relative}) not found. {how}")
    return path


def in_weights_dir(relative: str) -> bool:
    """Whether ``$VIDEOTUNA_WEIGHTS/relative`` exists (how ``auto`` backends pick their model)."""
    root = os.environ.get(WEIGHTS_ENV)
    return bool(root) and (Path(root).expanduser() / relative).is_file()


def pick_backend(scorer: str, option: str, value: str, choices: Sequence[str], explicit: str | None,
                 relative: str, with_weights: str, without: str) -> str:
    """Check ``value`` is one of ``choices``; resolve ``"auto"``: ``with_weights`` when the weights file is
    given (``explicit``) or at ``$VIDEOTUNA_WEIGHTS/relative``, else ``without``."""
    if value not in choices:
        raise UserError(f"{scorer}: unknown {option} {value!r}; choose one of {', '.join(choices)}")
    if value != "auto":
        return value
    return with_weights if explicit or in_weights_dir(relative) else without


TRUST_ENV = "VIDEOTUNA_TRUST_WEIGHTS"


def reject_unused(scorer: str, backend: str, **options: tuple[object, object]) -> None:
    """Refuse options set away from their default (``name=(value, default)``) that ``backend`` does not use."""
    unused = sorted(name for name, (value, default) in options.items() if value != default)
    if unused:
        raise UserError(f"{scorer}: option(s) {', '.join(unused)} do not apply to the {backend!r} backend; "
                        f"leave them out or pick the backend that uses them")


def load_state_dict(path: Path, scorer: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (unwrapping ``state_dict``/``model`` keys).

    Tensors only: a file that also pickles Python objects is refused unless ``$VIDEOTUNA_TRUST_WEIGHTS=1``.
    Unreadable files are a :class:`UserError` naming ``scorer`` and the file.
    """
    try:
        obj = load_weights(path, TRUST_ENV, trusted=os.environ.get(TRUST_ENV) == "1",
                           how_to_trust=f"set {TRUST_ENV}=1")
    except UserError as exc:
        raise type(exc)(f"{scorer}: {exc}" if scorer else str(exc)) from None
    for key in ("state_dict", "model", "params"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise UserError(f"{scorer + ': ' if scorer else ''}{path}: expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def to_uint8_levels(videos: torch.Tensor) -> torch.Tensor:
    """Float ``[..]`` in [0, 1] -> float on 0..255 rounded to 8-bit levels, as VBench reads files."""
    return (videos.clamp(0, 1) * 255.0).round()
