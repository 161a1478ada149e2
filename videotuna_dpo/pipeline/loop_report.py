"""The report of ``videotuna loop``: ``OUT/report/loop.json``, ``loop.html`` and PNG plots.

Per round: OmniScore and every dimension of the held-out samples (round 0 is the base), the win rates
against the base and against the previous round, the judges and the motion measures apart from the
training scorers, the guards' warnings and what training logged last (loss, implicit accuracy).
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from videotuna_dpo.fileio import atomic_entries, write_text_atomic
from videotuna_dpo.pipeline.guards import HACKING, MOTION_DROP, MOTION_SCORERS
from videotuna_dpo.pipeline.plots import _pyplot, save_figure
from videotuna_dpo.pipeline.report import _fmt, _html_table, json_safe, split_rows
from videotuna_dpo.user_files import read_json

REPORT_ENTRIES = ("plots", "loop.json", "loop.html")  # the page last: it names the others
TRAIN_METRICS = ("train/loss", "train/implicit_acc", "train/reward_margin")


def last_logged(run: Path) -> dict[str, float]:
    """The last logged value of each of :data:`TRAIN_METRICS` in a run's newest ``logs/version_*/metrics.csv``."""
    versions = sorted((run / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    found: dict[str, float] = {}
    if not versions:
        return found
    with open(versions[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key in TRAIN_METRICS:
                if row.get(key):
                    found[key] = float(row[key])
    return found


def _lite(table: Mapping[str, Any]) -> dict:
    """A comparison table without its per-video list."""
    return {"pairs": table["pairs"], "rows": table["rows"], "guards": table.get("guards", {})}


def round_record(out: Path, r: int) -> dict:
    """What round ``r`` made and measured, from its files (``round_<r>/eval.json``, pairs and run)."""
    rd = out / f"round_{r}"
    evaluation = read_json(rd / "eval.json")
    against = {name: _lite(table) for name, table in evaluation["against"].items()}
    pairs = read_json(rd / "pairs" / "summary.json")
    guards = [t["guards"] for t in against.values()]
    return {
        "round": r,
        "pairs": pairs["pairs"], "motion_refused": pairs.get("motion_refused"),
        "train": {**last_logged(rd / "run"), "global_step": read_json(rd / "run" / "run.json")["global_step"]},
        "weights": str(rd / "weights" / "last"),
        "against": against,
        "possible_reward_hacking": any(g.get("possible_reward_hacking") for g in guards),
        "motion_drop": any(g.get("motion_drop") for g in guards),
        "warnings": [w for g in guards for w in g.get("warnings", [])],
    }


def _value(row: Mapping[str, Any], key: str) -> float:
    v = row[key]
    if isinstance(v, str):  # "inf" / "-inf" as json_safe wrote them
        return float(v)
    return float("nan") if v is None else float(v)


def per_round(summary: Mapping[str, Any]) -> dict[str, list[float]]:
    """``{dimension: [base mean, round 1 mean, ...]}`` over the held-out videos, from the rounds' tables vs base."""
    series: dict[str, list[float]] = {}
    rounds = summary["rounds"]
    for i, rec in enumerate(rounds):
        for row in rec["against"]["base"]["rows"]:
            values = series.setdefault(row["dimension"], [float("nan")] * (len(rounds) + 1))
            values[0] = _value(row, "base")
            values[i + 1] = _value(row, "tuned")
    return series


def win_rates(summary: Mapping[str, Any], dimension: str = "omniscore") -> dict[str, list[float]]:
    """Win rate of each round against the base and against the previous round (NaN for round 1)."""
    out = {"base": [], "previous": []}
    for rec in summary["rounds"]:
        prev = f"round_{rec['round'] - 1}"
        for name, key in (("base", "base"), ("previous", prev)):
            row = next((x for x in rec["against"].get(key, {}).get("rows", []) if x["dimension"] == dimension), None)
            out[name].append(float("nan") if row is None else row["win_rate"])
    return out


def _kinds(summary: Mapping[str, Any]) -> dict[str, str]:
    judges = set(summary.get("judges") or ())
    kinds = {}
    for dim in per_round(summary):
        name = dim.split("/", 1)[-1]
        kinds[dim] = ("judge" if dim.startswith("raw/") and name in judges else
                      "motion" if dim.startswith("raw/") and name in MOTION_SCORERS else "training")
    return kinds


def shown_dimensions(summary: Mapping[str, Any]) -> list[str]:
    """The rows plotted per round: OmniScore, its groups, normalised dimensions, judges and motion (raw)."""
    kinds = _kinds(summary)
    return [d for d in per_round(summary)
            if not d.startswith("raw/") or kinds[d] != "training" or f"normalized/{d[4:]}" not in kinds]


# ---------------------------------------------------------------- figures


def omniscore_plot(path: Path, summary: Mapping[str, Any]) -> str:
    """Mean held-out OmniScore per round (0 = base), each round marked with its win rates."""
    plt = _pyplot()
    values = per_round(summary).get("omniscore", [])
    rates = win_rates(summary)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = np.arange(len(values))
    ax.plot(x, values, marker="o", color="#4c72b0")
    for i in range(1, len(values)):
        note = f"win {rates['base'][i - 1]:.2f} vs base"
        if i > 1:
            note += f"\n{rates['previous'][i - 1]:.2f} vs r{i - 1}"
        ax.annotate(note, (x[i], values[i]), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xticks(x, ["base"] + [f"round {i}" for i in range(1, len(values))])
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel("mean OmniScore (held out)")
    ax.set_title("Training OmniScore per round")
    return save_figure(fig, path)


def dimensions_plot(path: Path, summary: Mapping[str, Any]) -> str:
    """One small panel per dimension: its held-out mean per round, titled with its kind (training/judge/motion)."""
    plt = _pyplot()
    series, kinds = per_round(summary), _kinds(summary)
    dims = shown_dimensions(summary)
    cols = min(4, len(dims))
    rows = math.ceil(len(dims) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    colour = {"training": "#4c72b0", "judge": "#dd8452", "motion": "#55a868"}
    for ax, dim in zip(axes.flat, dims):
        x = np.arange(len(series[dim]))
        ax.plot(x, series[dim], marker="o", color=colour[kinds[dim]])
        ax.set_xticks(x, ["base"] + [str(i) for i in range(1, len(x))], fontsize=7)
        ax.set_title(f"{dim.split('/', 1)[-1]} [{kinds[dim]}{', raw' if dim.startswith('raw/') else ''}]", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)
    for ax in list(axes.flat)[len(dims):]:
        ax.set_visible(False)
    fig.suptitle("Held-out means per round (base, then each round)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def win_rate_plot(path: Path, summary: Mapping[str, Any]) -> str:
    """Win rate per round against the base (solid) and the previous round (dashed): OmniScore and each judge."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    rounds = [rec["round"] for rec in summary["rounds"]]
    for dim in ["omniscore"] + [f"raw/{j}" for j in summary.get("judges") or ()]:
        rates = win_rates(summary, dim)
        line, = ax.plot(rounds, rates["base"], marker="o", label=f"{dim.split('/', 1)[-1]} vs base")
        if len(rounds) > 1:
            ax.plot(rounds, rates["previous"], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{dim.split('/', 1)[-1]} vs previous")
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("win rate (ties count half)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Win rates per round")
    return save_figure(fig, path)


# ---------------------------------------------------------------- the page


def summary_line(summary: Mapping[str, Any]) -> str:
    """One line: rounds, OmniScore base -> last round, and the guards' verdict."""
    values = per_round(summary).get("omniscore", [])
    head = f"loop: {summary['rounds_done']} round(s)"
    if len(values) > 1:
        last = summary["rounds"][-1]["against"]["base"]["rows"]
        omni = next(r for r in last if r["dimension"] == "omniscore")
        head += (f"; held-out OmniScore base {values[0]:.4f} -> round {len(values) - 1} {values[-1]:.4f} "
                 f"(delta {omni['delta']:+.4f}, paired z {_fmt(omni['z'], 2)}, win rate {omni['win_rate']:.2f})")
    flags = [HACKING.upper()] if summary["possible_reward_hacking"] else []
    flags += [MOTION_DROP] if summary["motion_drop"] else []
    return head + ("; " + ", ".join(flags) if flags else "; guards quiet")


def _page(summary: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>videotuna loop</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             ".up{color:#1a7f37}.down{color:#c62828}.warn{color:#c62828;font-weight:bold}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:1em}",
             "</style></head><body><h1>videotuna loop</h1>", f"<p><b>{esc(summary_line(summary))}</b></p>"]
    if summary["possible_reward_hacking"]:
        parts.append(f"<p class='warn'>&#9888; {esc(HACKING)}: the training OmniScore rose while a judge the training "
                     "never used fell beyond its noise (paired z &lt; -2).</p>")
    for warning in summary["warnings"]:
        parts.append(f"<p class='warn'>&#9888; {esc(warning)}</p>")
    if summary.get("stopped_after"):
        parts.append(f"<p class='warn'>Stopped after round {summary['stopped_after']} (loop.stop_on_hacking).</p>")
    parts.append(f"<p>Training scorers: {esc(', '.join(summary['scorers']))}. Judges (never used in training): "
                 f"{esc(', '.join(summary['judges']) or 'none (set eval.judges)')}. Motion, measured apart: "
                 f"{esc(', '.join(MOTION_SCORERS))}.</p>")
    for key in ("omniscore", "dimensions", "win_rates"):
        if key in plots:
            parts.append(f"<img src='{esc(plots[key])}' alt='{key}'>")
    parts.append(_rounds_table(summary))
    judges = summary.get("judges") or []
    measured = sorted(set(MOTION_SCORERS) | set(judges))
    for rec in summary["rounds"]:
        for against, table in rec["against"].items():
            parts.append(f"<h2>round {rec['round']} vs {esc(against)} ({table['pairs']} paired videos)</h2>")
            split = split_rows(table, {"judges": judges, "measured": measured})
            for title, key in (("Training scorers", "training"), ("Judges (never used in training)", "judges"),
                               ("Motion (not in the OmniScore)", "motion")):
                if split[key]:
                    parts.append(f"<h3>{title}</h3>" + _html_table(table, split[key]))
    parts.append(f"<h2>Settings</h2><pre>{esc(json.dumps(json_safe(summary['settings']), indent=1))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _rounds_table(summary: Mapping[str, Any]) -> str:
    """One row per round: pairs, OmniScore vs base and vs previous, each judge and motion vs base, training's end."""
    judges = [f"raw/{j}" for j in summary.get("judges") or ()]
    motion = [f"raw/{m}" for m in MOTION_SCORERS]
    head = ["round", "pairs", "OmniScore vs base", "vs previous"] + [f"{d[4:]} (judge)" for d in judges] + \
        [d[4:] for d in motion] + ["train loss", "implicit acc", "guards"]
    rows = []
    for rec in summary["rounds"]:
        def cell(against: str, dim: str) -> str:
            row = next((x for x in rec["against"].get(against, {}).get("rows", []) if x["dimension"] == dim), None)
            if row is None:
                return "-"
            return f"{row['delta']:+.4f} (z {_fmt(row['z'], 2)}, win {row['win_rate']:.2f})"

        prev = f"round_{rec['round'] - 1}"
        flags = [HACKING] if rec["possible_reward_hacking"] else []
        flags += [MOTION_DROP] if rec["motion_drop"] else []
        cells = [str(rec["round"]), str(rec["pairs"]), cell("base", "omniscore"), cell(prev, "omniscore")]
        cells += [cell("base", d) for d in judges] + [cell("base", d) for d in motion]
        cells += [_fmt(rec["train"].get("train/loss")), _fmt(rec["train"].get("train/implicit_acc"), 3),
                  ", ".join(flags) or "quiet"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return ("<h2>Rounds</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(rows) + "</table>")


def write_loop_report(out: str | Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """Write ``OUT/report/`` (plots, loop.json, loop.html) as a whole; returns the paths."""
    report = Path(out) / "report"
    plots: dict[str, str] = {}
    with atomic_entries(report, REPORT_ENTRIES) as stage:
        if summary["rounds"]:
            plots["omniscore"] = os.path.relpath(omniscore_plot(stage / "plots" / "omniscore.png", summary), stage)
            plots["dimensions"] = os.path.relpath(dimensions_plot(stage / "plots" / "dimensions.png", summary), stage)
            plots["win_rates"] = os.path.relpath(win_rate_plot(stage / "plots" / "win_rates.png", summary), stage)
        data = {**summary, "per_round": per_round(summary) if summary["rounds"] else {},
                "summary_line": summary_line(summary), "plots": plots}
        write_text_atomic(stage / "loop.json", json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")
        write_text_atomic(stage / "loop.html", _page(summary, plots))
    return {"json": str(report / "loop.json"), "html": str(report / "loop.html"),
            **{k: str(report / v) for k, v in plots.items()}}
