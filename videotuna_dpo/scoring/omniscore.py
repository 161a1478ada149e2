"""The OmniScore aggregate of VideoDPO over VBench dimensions.

Each dimension is min-max normalised with VBench's constants (not clipped, as in VBench). Quality is
the weighted mean of the quality dimensions present, Semantic that of the semantic ones, and
OmniScore = (4 Quality + 1 Semantic) / 5. With the full set the quality weights sum to 5.5, the
paper's divisor; a reduced set divides by the weights actually used. Without any semantic dimension
Semantic is None and OmniScore equals Quality (likewise the other way round); the record says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from videotuna_dpo.errors import UserError

QUALITY_DIMENSIONS = (
    "subject_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "dynamic_degree",
    "aesthetic_quality",
    "imaging_quality",
)
SEMANTIC_DIMENSIONS = ("overall_consistency",)
DIMENSIONS = QUALITY_DIMENSIONS + SEMANTIC_DIMENSIONS
NO_WEIGHTS_DIMENSIONS = ("temporal_flickering", "dynamic_degree", "motion_smoothness", "imaging_quality")
# Always measured in evaluation (`videotuna eval` and the training callback), apart from the OmniScore unless
# they are among its scorers: DPO drifts toward low-motion video, and these show it.
MOTION_SCORERS = ("dynamic_degree", "motion_magnitude")

# VBench's min-max normalisation constants, as VideoDPO uses them.
RANGES: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "overall_consistency": (0.0, 0.364),
}
WEIGHTS: dict[str, float] = {name: 1.0 for name in DIMENSIONS} | {"dynamic_degree": 0.5}
KINDS: dict[str, str] = {name: "quality" for name in QUALITY_DIMENSIONS} | {"overall_consistency": "semantic"}
GROUP_WEIGHTS = {"quality": 4.0, "semantic": 1.0}


@dataclass
class OmniScoreConfig:
    """Weights, ranges and kinds per dimension; extra dimensions (e.g. from plugins) may be added here."""

    weights: dict[str, float] = field(default_factory=lambda: dict(WEIGHTS))
    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(RANGES))
    kinds: dict[str, str] = field(default_factory=lambda: dict(KINDS))
    group_weights: dict[str, float] = field(default_factory=lambda: dict(GROUP_WEIGHTS))

    def with_weights(self, overrides: Mapping[str, float]) -> "OmniScoreConfig":
        """A copy with some dimension weights replaced; unknown names are an error listing the known ones."""
        unknown = sorted(set(overrides) - set(self.ranges))
        if unknown:
            raise UserError(
                f"OmniScore weights for unknown dimension(s) {', '.join(unknown)}; known: {', '.join(self.ranges)}"
            )
        return OmniScoreConfig({**self.weights, **overrides}, dict(self.ranges), dict(self.kinds), dict(self.group_weights))


def omniscore_dimensions(names: Iterable[str], config: OmniScoreConfig | None = None) -> list[str]:
    """The names among ``names`` that are OmniScore dimensions under ``config``: a range and a weight > 0."""
    config = config or OmniScoreConfig()
    return [n for n in names if n in config.ranges and config.weights.get(n, 0.0) > 0]


def normalize(name: str, raw: float, config: OmniScoreConfig | None = None) -> float:
    """VBench min-max normalisation of one raw dimension value."""
    low, high = (config or OmniScoreConfig()).ranges[name]
    return (raw - low) / (high - low)


def omniscore(raw: Mapping[str, float], config: OmniScoreConfig | None = None) -> dict:
    """Raw dimension values -> {normalized, quality, semantic, omniscore, dimensions_used, weights}.

    Dimensions without a range in ``config`` (e.g. a plugin's) are listed under ``ignored``; without any
    dimension (see :func:`omniscore_dimensions`) there is no OmniScore, an error naming the dimensions.
    """
    config = config or OmniScoreConfig()
    used = omniscore_dimensions(raw, config)
    for name in used:
        if not math.isfinite(raw[name]):
            raise ValueError(f"OmniScore: dimension {name} is {raw[name]!r}, not a finite number")
    normalized = {n: normalize(n, float(raw[n]), config) for n in used}
    groups: dict[str, float | None] = {}
    for group in ("quality", "semantic"):
        members = [n for n in used if config.kinds.get(n, "quality") == group]
        total = sum(config.weights[n] for n in members)
        groups[group] = sum(config.weights[n] * normalized[n] for n in members) / total if members else None
    present = [g for g in groups if groups[g] is not None]
    if not present:
        raise UserError(
            f"OmniScore needs at least one of the dimensions {', '.join(config.ranges)}; got {', '.join(raw) or 'none'}"
        )
    gw = sum(config.group_weights[g] for g in present)
    total = sum(config.group_weights[g] * groups[g] for g in present) / gw
    return {
        "normalized": normalized,
        "quality": groups["quality"],
        "semantic": groups["semantic"],
        "omniscore": total,
        "dimensions_used": used,
        "weights": {n: config.weights[n] for n in used},
        "ignored": [n for n in raw if n not in used],
    }
