"""The evaluation report: report.json, a self-contained report.html, PNG plots and sample grids.

Input is the summary of :func:`videotuna_dpo.pipeline.evaluate.evaluate` (or one built by hand):
``{"tables": {label: compare_scores table}, "settings": {...}, "counts": {...}}``. The report is
written as a whole; the HTML refers to the PNGs by paths relative to the report directory.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from videotuna_dpo.data.video_io import read_video
from videotuna_dpo.fileio import atomic_entries, write_text_atomic
from videotuna_dpo.pipeline.plots import _pyplot, save_figure

GRID_PROMPTS = 4
GRID_FRAMES = 8


def json_safe(value: Any) -> Any:
    """Plain JSON: +-inf becomes the strings "inf"/"-inf" and NaN becomes null (z-scores can be infinite)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(table: Mapping[str, Any]) -> str:
    """Plain-text table of a comparison: dimension, base, tuned, delta, win rate (and the z-score)."""
    headers = ["dimension", "base", "tuned", "delta", "win rate", "z"]
    rows = [[r["dimension"], _fmt(r["base"]), _fmt(r["tuned"]), f"{r['delta']:+.4f}", f"{r['win_rate']:.3f}",
             _fmt(r["z"], 2)] for r in table["rows"]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


# ---------------------------------------------------------------- figures


def delta_bars(path: Path, tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Grouped bars: tuned - base per normalised dimension, quality, semantic and OmniScore, per model."""
    plt = _pyplot()
    labels = list(tables)
    dims: list[str] = []
    for table in tables.values():
        dims += [r["dimension"] for r in table["rows"] if not r["dimension"].startswith("raw/") and r["dimension"] not in dims]
    deltas = {label: {r["dimension"]: r["delta"] for r in t["rows"]} for label, t in tables.items()}
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(dims)), 3.4))
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(dims))
    for i, label in enumerate(labels):
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [deltas[label].get(d, np.nan) for d in dims], width, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x, [d.removeprefix("normalized/") for d in dims], rotation=30, ha="right")
    ax.set_ylabel("tuned - base (mean)")
    ax.set_title("Change per dimension (normalised)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def diff_histogram(path: Path, table: Mapping[str, Any], label: str) -> str:
    """Histogram of the paired OmniScore differences (tuned - base, same prompt and seed), 0 marked."""
    plt = _pyplot()
    diffs = np.asarray([p["diff"] for p in table["paired"]], dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(diffs, bins=min(30, max(5, len(diffs) // 2)), color="#4c72b0", edgecolor="white")
    ax.axvline(0.0, color="black", linewidth=1.0, linestyle="--")
    ax.set_xlim(min(0.0, diffs.min()) - 0.05 * np.ptp(np.append(diffs, 0.0)) - 1e-6,
                max(0.0, diffs.max()) + 0.05 * np.ptp(np.append(diffs, 0.0)) + 1e-6)
    ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    ax.set_title(f"{label} - base: paired OmniScore differences")
    ax.set_xlabel("OmniScore difference (tuned - base)")
    ax.set_ylabel("count")
    return save_figure(fig, path)


def _strip(video: Path, frames: int) -> np.ndarray:
    """uint8 [H, frames * W, 3]: evenly spaced frames of ``video`` side by side."""
    clip = read_video(video)  # uint8 [F, C, H, W]
    index = np.unique(np.linspace(0, clip.shape[0] - 1, min(frames, clip.shape[0])).round().astype(int))
    return np.concatenate([clip[i].permute(1, 2, 0).numpy() for i in index], axis=1)


def sample_grid(path: Path, prompt: str, seed: Any, rows: list[tuple[str, Path]], frames: int = GRID_FRAMES) -> str:
    """One PNG per prompt and seed: a strip of frames per model, base first."""
    plt = _pyplot()
    strips = [(label, _strip(video, frames)) for label, video in rows]
    h, w = strips[0][1].shape[:2]
    fig, axes = plt.subplots(len(strips), 1, figsize=(min(14.0, 1.2 + w / 32), 0.5 + 1.1 * len(strips) * h / 32),
                             squeeze=False)
    for ax, (label, strip) in zip(axes[:, 0], strips):
        ax.imshow(strip, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    axes[0, 0].set_title(f"{prompt}  (seed {seed})", fontsize=9)
    return save_figure(fig, path)


def _grids(out: Path, tables: Mapping[str, Mapping[str, Any]], n_prompts: int) -> list[dict]:
    """Grids for the first sample of the first ``n_prompts`` prompts that every model has."""
    first = next(iter(tables.values()))
    tuned = {label: {p["key"]: p for p in t["paired"]} for label, t in tables.items()}
    grids, seen = [], set()
    for pair in first["paired"]:
        if pair["prompt"] in seen or not all(pair["key"] in by_key for by_key in tuned.values()):
            continue
        seen.add(pair["prompt"])
        rows = [("base", Path(pair["base_path"]))] + [(label, Path(by_key[pair["key"]]["tuned_path"]))
                                                      for label, by_key in tuned.items()]
        png = sample_grid(out / "grids" / f"{pair['key']}.png", pair["prompt"], pair["seed"], rows)
        grids.append({"key": pair["key"], "prompt": pair["prompt"], "seed": pair["seed"],
                      "png": os.path.relpath(png, out), "videos": {label: str(v) for label, v in rows}})
        if len(grids) == n_prompts:
            break
    return grids


# ---------------------------------------------------------------- the page


def _html_table(table: Mapping[str, Any], rows: list | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("dimension", "base", "tuned", "delta", "win rate", "z", "n"))
    body = []
    for r in table["rows"] if rows is None else rows:
        cls = "up" if r["delta"] > 0 else "down" if r["delta"] < 0 else ""
        body.append(f"<tr><td>{html.escape(r['dimension'])}</td><td>{_fmt(r['base'])}</td><td>{_fmt(r['tuned'])}</td>"
                    f"<td class='{cls}'>{r['delta']:+.4f}</td><td>{r['win_rate']:.3f}</td><td>{_fmt(r['z'], 2)}</td>"
                    f"<td>{r['n']}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def split_rows(table: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, list]:
    """A table's rows as the report shows them apart: ``training`` (OmniScore, its groups and the training
    scorers), ``judges`` (``eval.judges``, never used in training) and ``motion`` (measured, not trained on)."""
    judges = {f"raw/{j}" for j in settings.get("judges") or ()}
    measured = {f"raw/{m}" for m in settings.get("measured") or ()} - judges
    parts: dict[str, list] = {"training": [], "judges": [], "motion": []}
    for r in table["rows"]:
        key = "judges" if r["dimension"] in judges else "motion" if r["dimension"] in measured else "training"
        parts[key].append(r)
    return parts


def _guarded_tables(table: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """The training scorers' table, then the judges' and the motion measures' apart, and the guards' warnings."""
    esc = html.escape
    parts = split_rows(table, settings)
    guards = table.get("guards") or {}
    out = []
    for warning in guards.get("warnings", []):
        out.append(f"<p class='warn'>&#9888; {esc(warning)}</p>")
    scorers = ", ".join(settings.get("scorers") or [])
    out.append(f"<h3>Training scorers</h3><p>The OmniScore of {esc(scorers or 'the scorers used')}.</p>")
    out.append(_html_table(table, parts["training"]))
    if parts["judges"]:
        out.append("<h3>Judges (never used in training)</h3><p>Raw scores, higher is better. A judge falling (paired "
                   "z &lt; -2) while the training OmniScore rises marks possible reward hacking.</p>")
        out.append(_html_table(table, parts["judges"]))
    if parts["motion"]:
        out.append("<h3>Motion (measured, not in the OmniScore)</h3><p>dynamic_degree and the mean optical-flow "
                   "magnitude (pixels per frame); a significant drop (paired z &lt; -2) is a warning.</p>")
        out.append(_html_table(table, parts["motion"]))
    return "\n".join(out)


def _page(summary: Mapping[str, Any], plots: Mapping[str, str], grids: list[dict]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>videotuna eval report</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             ".up{color:#1a7f37}.down{color:#c62828}.warn{color:#c62828;font-weight:bold}img{max-width:100%;margin:0.5em 0}pre{background:#f6f6f6;padding:1em}",
             "</style></head><body><h1>videotuna eval</h1>"]
    tables = summary.get("tables", {})
    if not tables:
        parts.append("<p>No tuned weights were given: only the base model was sampled and scored.</p>")
    for label, table in tables.items():
        omni = next((r for r in table["rows"] if r["dimension"] == "omniscore"), None)
        parts.append(f"<h2>{esc(label)} vs base</h2>")
        if omni is not None:
            parts.append(f"<p>OmniScore {omni['base']:.4f} &rarr; {omni['tuned']:.4f} (delta {omni['delta']:+.4f}), "
                         f"win rate {omni['win_rate']:.3f}, paired z {_fmt(omni['z'], 2)} over {table['pairs']} "
                         f"paired videos (same prompt and seed); unpaired: {table['unpaired']['base']} base, "
                         f"{table['unpaired']['tuned']} tuned; failed scoring: {table['failed']['base']} base, "
                         f"{table['failed']['tuned']} tuned.</p>")
        parts.append(_guarded_tables(table, summary.get("settings") or {}))
        if f"diff_{label}" in plots:
            parts.append(f"<img src='{esc(plots[f'diff_{label}'])}' alt='paired OmniScore differences of {esc(label)}'>")
    if "deltas" in plots:
        parts.append(f"<h2>Change per dimension</h2><img src='{esc(plots['deltas'])}' alt='delta per dimension'>")
    if grids:
        parts.append("<h2>Samples: same prompt, same seed</h2><p>Each row is one model, left to right evenly spaced "
                     "frames; base first.</p>")
        for g in grids:
            parts.append(f"<h3>{esc(g['prompt'])} <small>({esc(g['key'])}, seed {esc(str(g['seed']))})</small></h3>"
                         f"<img src='{esc(g['png'])}' alt='{esc(g['prompt'])}'>")
    if summary.get("counts"):
        parts.append(f"<h2>Counts</h2><pre>{esc(json.dumps(json_safe(summary['counts']), indent=1))}</pre>")
    if summary.get("settings"):
        parts.append(f"<h2>Settings</h2><pre>{esc(json.dumps(json_safe(summary['settings']), indent=1))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


REPORT_ENTRIES = ("plots", "grids", "report.json", "report.html")  # the page last: it names the others


def write_report(out: str | Path, summary: Mapping[str, Any], grid_prompts: int = GRID_PROMPTS) -> dict[str, str]:
    """Write plots, sample grids, report.json and report.html under ``out``; returns their paths.

    All are rendered first and then renamed into place, so a failure leaves the previous report whole.
    """
    out = Path(out)
    tables = summary.get("tables", {})
    plots: dict[str, str] = {}
    with atomic_entries(out, REPORT_ENTRIES) as stage:
        if tables:
            plots["deltas"] = os.path.relpath(delta_bars(stage / "plots" / "deltas.png", tables), stage)
            for label, table in tables.items():
                plots[f"diff_{label}"] = os.path.relpath(diff_histogram(stage / "plots" / f"omniscore_diff_{label}.png",
                                                                        table, label), stage)
        grids = _grids(stage, tables, grid_prompts) if tables and grid_prompts > 0 else []
        report = {**summary, "plots": plots, "grids": grids}
        write_text_atomic(stage / "report.json", json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
        write_text_atomic(stage / "report.html", _page(summary, plots, grids))
    return {"json": str(out / "report.json"), "html": str(out / "report.html"),
            **{k: str(out / v) for k, v in plots.items()}, **{f"grid_{g['key']}": str(out / g["png"]) for g in grids}}
