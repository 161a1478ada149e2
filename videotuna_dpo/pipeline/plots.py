"""PNG figures of a preference dataset (the VideoDPO paper's figure 2 panels) and of evaluations."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from videotuna_dpo.fileio import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> str:
    """Save ``fig`` as PNG atomically and close it."""
    try:
        with atomic_file(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return str(path)


def histogram(path: Path, values: Sequence[float], title: str, xlabel: str, bins: Any = 30) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(np.asarray(values, dtype=float), bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return save_figure(fig, path)


def correlation_heatmap(path: Path, columns: dict[str, Sequence[float]], title: str) -> str:
    """Pearson correlations between named columns (constant columns show as blank)."""
    plt = _pyplot()
    names = list(columns)
    data = np.asarray([columns[n] for n in names], dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(data) if len(names) > 1 else np.ones((1, 1))
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(names), 0.8 + 0.6 * len(names)))
    im = ax.imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(corr[i, j]):
                ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    return save_figure(fig, path)


def pair_plots(out: Path, records: list[dict], pairs: list, weights: np.ndarray, scores: Sequence[float],
               by: str = "omniscore") -> dict[str, str]:
    """Histogram of ``scores``, the records' ranking score ``by`` (the OmniScore unless ``pairs --by``), pair-gap
    histogram, weight histogram, correlation heatmap of the normalised dimensions and that score."""
    label = "OmniScore" if by == "omniscore" else by
    dims = sorted({d for r in records for d in r.get("normalized", {})})
    columns = {d: [r.get("normalized", {}).get(d, np.nan) for r in records] for d in dims}
    columns[by] = scores
    return {
        f"{by}_hist": histogram(out / f"{by}_hist.png", scores, f"{label} of all samples", label,
                                bins=np.arange(np.floor(min(scores) * 100) / 100, max(scores) + 0.02, 0.01)),
        "gap_hist": histogram(out / "pair_gap_hist.png", [p.gap for p in pairs], f"{label} gap of pairs", "winner - loser"),
        "weight_hist": histogram(out / "weight_hist.png", weights, "Pair weights", "weight"),
        "dimension_correlation": correlation_heatmap(out / "dimension_correlation.png", columns,
                                                     "Correlation of normalised dimensions"),
    }
