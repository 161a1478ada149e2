"""Scorers by name: built from the registry with their options, called, and combined into the OmniScore settings.

Used by ``videotuna score``, ``videotuna eval`` and the training eval callback.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

from videotuna_dpo.errors import UserError
from videotuna_dpo.registry import Registry, call_with_optional
from videotuna_dpo.scoring.base import MissingWeightsError, Scorer
from videotuna_dpo.scoring.omniscore import NO_WEIGHTS_DIMENSIONS, OmniScoreConfig


def build_scorers(names: Sequence[str], device: str, options: Mapping[str, Mapping[str, Any]], registry=None) -> dict:
    """Create every named scorer; all missing-weights problems are reported together."""
    registry = registry or Registry.load()
    unknown_opts = sorted(set(options) - set(names))
    if unknown_opts:
        raise UserError(f"--option given for scorer(s) not being run: {', '.join(unknown_opts)}; running: {', '.join(names)}")
    scorers, problems = {}, []
    for name in names:
        factory = registry.get("scorer", name)
        kwargs = dict(options.get(name, {}))
        optional = {} if "device" in kwargs else {"device": device}  # an explicit --option NAME.device wins
        try:
            scorer = call_with_optional(partial(factory, **kwargs), **optional)
        except MissingWeightsError as exc:
            problems.append(str(exc))
            continue
        except TypeError as exc:
            raise UserError(f"scorer {name}: bad options {sorted(kwargs)}: {exc}") from exc
        if not isinstance(scorer, Scorer) or scorer.kind not in ("quality", "semantic"):
            raise UserError(
                f"scorer {name} ({type(scorer).__module__}.{type(scorer).__qualname__}) does not follow the scorer "
                f"contract: it needs kind ('quality'/'semantic'), needs_weights, weights_hint, version and __call__"
            )
        scorers[name] = scorer
    if problems:
        raise UserError(
            "missing scorer weights:\n  " + "\n  ".join(problems)
            + f"\nOr score only the dimensions that need no weights: --scorers {','.join(NO_WEIGHTS_DIMENSIONS)}"
        )
    return scorers


def omniscore_config(models: Mapping[str, Any], weights: Mapping[str, float] | None = None):
    """The OmniScore settings for these scorers: kinds, plus ranges of plugin dimensions that declare one."""
    config = OmniScoreConfig()
    for name, scorer in models.items():
        config.kinds.setdefault(name, scorer.kind)
        if getattr(scorer, "score_range", None) is not None:  # a plugin dimension joining the OmniScore
            config.ranges.setdefault(name, tuple(scorer.score_range))
            config.weights.setdefault(name, float(getattr(scorer, "score_weight", 1.0)))
    return config.with_weights(weights or {})


def describe_scorer(scorer: Any) -> dict:
    """What a score record keeps of its scorer: its ``describe()``, else its version and weights hint."""
    if hasattr(scorer, "describe"):
        return scorer.describe()
    return {"version": str(scorer.version), "weights": scorer.weights_hint or None}


def unscorable_reason(scorer: Any, num_frames: int, height: int, width: int) -> str | None:
    """Why ``scorer`` cannot score a video of this size, when it declares ``unscorable`` (BaseScorer does;
    plugin scorers may only declare ``min_frames``, which callers check), else None."""
    check = getattr(scorer, "unscorable", None)
    return check(int(num_frames), int(height), int(width)) if callable(check) else None


def call_scorer(scorer: Any, clip: Any, texts: list[str], fps: float | None, shared: Any = None) -> Any:
    """Score a batch; scorers that declare ``uses_fps`` also get the files' frame rate, those that declare
    ``uses_shared`` the batch's :class:`~videotuna_dpo.scoring.shared_frames.SharedFrames` (when given)."""
    extra = {}
    if getattr(scorer, "uses_fps", False):
        extra["fps"] = fps
    if shared is not None and getattr(scorer, "uses_shared", False):
        extra["shared"] = shared
    return scorer(clip, texts, **extra)


def score_batch(models: Mapping[str, Any], clip: Any, texts: list[str], fps: float | None,
                levels: Any = None) -> dict:
    """Every scorer on one batch ``clip`` (float ``[B, F, C, H, W]`` in [0, 1]) -> ``{name: float64 [B]}`` on the CPU.

    The scorers share one :class:`~videotuna_dpo.scoring.shared_frames.SharedFrames`: the 8-bit frames
    (``levels``, uint8 ``[B, F, C, H, W]``, when the caller has them from the decoder), resized frames
    and optical flow are computed once for all of them.
    """
    from videotuna_dpo.scoring.shared_frames import SharedFrames  # torch and OpenCV: only when scoring

    shared = SharedFrames(clip, levels)
    return {name: call_scorer(scorer, clip, texts, fps, shared).detach().double().cpu().reshape(clip.shape[0])
            for name, scorer in models.items()}
