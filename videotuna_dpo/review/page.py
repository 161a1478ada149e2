"""The review page: what it shows (pairs of a preference dataset or of an eval report) and writing it.

The page is index.html + review.css + review.js (shipped in ``assets/``, no build step, nothing from a network)
+ review-data.js (``window.REVIEW = {...}``: the videos, pairs and plots) + plots/*.png. It opens from disk
(videos by relative paths) or from ``videotuna review --serve`` (videos by number, labels saved by the server).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np

from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import atomic_entries, write_text_atomic
from videotuna_dpo.review.labels import LABELS, ROLES, HashCache
from videotuna_dpo.user_files import read_json

ASSETS = Path(__file__).resolve().parent / "assets"
PAGE_ENTRIES = ("plots", "videos", "review.css", "review.js", "review-data.js", "index.html")  # the page last
DATA_FILE = "review-data.js"
GROUPS = ("omniscore", "quality", "semantic")
# What every browser shows as it is: other videos get a preview (lossless RGB H.264, which the demo writes, plays in
# Chromium in wrong colours: its planes are taken for YUV).
BROWSER_CODECS = ("h264", "vp8", "vp9", "av1")
BROWSER_PIXEL_FORMATS = ("yuv420p", "yuvj420p")
PREVIEW_SIDE = 256  # small videos are enlarged (whole pixels, an even factor) so 4:2:0 chroma keeps every pixel's colour


def _values(record: Mapping[str, Any]) -> dict[str, float]:
    """Every number of a score record shown on the page: omniscore, quality, semantic, normalized/X, raw/X."""
    from videotuna_dpo.data.scores import record_values

    return {k: v for k, v in record_values(record).items() if math.isfinite(v)}


def _dimensions(videos: list[dict]) -> list[str]:
    names = {k for v in videos for k in v["values"]}
    return ([g for g in GROUPS if g in names] + sorted(n for n in names if n.startswith("normalized/"))
            + sorted(n for n in names if n.startswith("raw/")))


def find_source(data: str | Path) -> tuple[str, Path]:
    """``("pairs", train_data.yaml)`` for a dataset dir or its yaml, ``("eval", report dir)`` for an eval report."""
    data = Path(data)
    if data.is_file() and data.suffix in (".yaml", ".yml"):
        return "pairs", data
    if (data / "train_data.yaml").is_file():
        return "pairs", data / "train_data.yaml"
    if (data / "report.json").is_file():
        return "eval", data
    if data.is_file() and data.name == "report.json":
        return "eval", data.parent
    raise UserError(f"--data {data}: neither a preference dataset (a dir with train_data.yaml, as `videotuna pairs` "
                    f"writes it) nor an eval report (a dir with report.json, as `videotuna eval` writes it)")


def _check_files(videos: list[dict], what: str) -> None:
    missing = [v["file"] for v in videos if not Path(v["file"]).is_file()]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{what}: {len(missing)} video file(s) missing: {', '.join(missing[:5])}{more}")


def pairs_source(train_data: Path) -> dict[str, Any]:
    """Videos and pairs of a preference dataset, from each META dir's manifest.json (``videotuna pairs``)."""
    from videotuna_dpo.data.preference import meta_dirs

    videos: list[dict] = []
    index: dict[str, int] = {}
    pairs: list[dict] = []
    for d in meta_dirs(train_data):
        manifest_path = d / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{d}: no manifest.json; review reads each video's scores from the manifest that "
                            f"`videotuna pairs` writes (build the dataset with it from scores.jsonl)")
        manifest = read_json(manifest_path)
        rows = manifest.get("pairs") if isinstance(manifest, dict) else None
        listed = manifest.get("videos") if isinstance(manifest, dict) else None
        if not isinstance(rows, list) or not isinstance(listed, list):
            raise UserError(f"{manifest_path}: expected \"videos\" and \"pairs\" lists, as `videotuna pairs` writes them")
        local = []
        for i, v in enumerate(listed):
            if not isinstance(v, dict) or not isinstance(v.get("path"), str) or not isinstance(v.get("clip_path"), str):
                raise UserError(f"{manifest_path}: videos[{i}] needs \"path\" and \"clip_path\"")
            if v["path"] not in index:
                clip = Path(v["clip_path"])
                index[v["path"]] = len(videos)
                videos.append({"path": v["path"], "file": os.path.normpath(clip if clip.is_absolute() else d / clip),
                               "prompt": v.get("prompt", ""), "seed": v.get("seed"), "values": _values(v)})
            local.append(index[v["path"]])
        for r, p in enumerate(rows):
            try:
                a, b = local[p["winner"]], local[p["loser"]]
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{manifest_path}: pairs[{r}] needs winner and loser indices into \"videos\"") from None
            pairs.append({"a": a, "b": b, "row": len(pairs), "prompt": p.get("prompt", ""), "gap": p.get("gap"),
                          "probability": p.get("probability"), "weight": p.get("weight"),
                          "origin": p.get("origin", "scorer")})
    _check_files(videos, str(train_data))
    return {"kind": "pairs", "root": train_data.parent, "videos": videos, "pairs": pairs,
            "title": f"review: {train_data.parent.name}", "runs": {}}


def eval_source(report_dir: Path) -> dict[str, Any]:
    """Base and tuned videos of an eval report, paired by prompt and seed, with every scored dimension."""
    from videotuna_dpo.data.scores import read_scores

    report = read_json(report_dir / "report.json")
    tables = report.get("tables") if isinstance(report, dict) else None
    if not isinstance(tables, dict) or not tables:
        raise UserError(f"{report_dir / 'report.json'}: no comparison tables (was the eval run with --weights?); "
                        f"there is nothing to compare base with")
    scores_dir = report_dir / "scores"
    base_file = scores_dir / "base.jsonl"
    if not base_file.is_file():
        raise UserError(f"{report_dir}: no scores/base.jsonl; review reads the scores that `videotuna eval` wrote there")
    base_scores = read_scores(base_file)
    videos: list[dict] = []
    index: dict[str, int] = {}

    def video(record: Mapping[str, Any] | None, path: str, run: str) -> int:
        if path not in index:
            file = Path(path)
            if not file.is_file():  # a moved report: its samples moved with it
                file = report_dir / "samples" / run / file.name
            index[path] = len(videos)
            videos.append({"path": path, "file": str(file), "prompt": (record or {}).get("prompt", ""),
                           "seed": ((record or {}).get("meta") or {}).get("seed"), "values": _values(record or {})})
        return index[path]

    pairs, runs = [], {}
    for run, table in tables.items():
        tuned_file = scores_dir / f"{run}.jsonl"
        if not tuned_file.is_file():
            raise UserError(f"{report_dir}: no scores/{run}.jsonl for the run {run!r} of report.json")
        tuned_scores = read_scores(tuned_file)
        omni = next((r for r in table.get("rows", []) if r.get("dimension") == "omniscore"), {})
        runs[run] = {"win_rate": omni.get("win_rate"), "pairs": table.get("pairs")}
        for p in table.get("paired", []):
            a = video(base_scores.get(p["base_path"]), p["base_path"], "base")
            b = video(tuned_scores.get(p["tuned_path"]), p["tuned_path"], run)
            pairs.append({"a": a, "b": b, "row": len(pairs), "prompt": p.get("prompt", ""), "seed": p.get("seed"),
                          "run": run, "key": p.get("key"), "gap": p.get("diff")})
    _check_files(videos, str(report_dir / "report.json"))
    return {"kind": "eval", "root": report_dir, "videos": videos, "pairs": pairs, "title": f"review: {report_dir.name}",
            "runs": runs, "tables": tables}


def load_source(data: str | Path) -> dict[str, Any]:
    """What the page shows for ``--data`` (a preference dataset or an eval report), videos hashed."""
    kind, where = find_source(data)
    source = pairs_source(where) if kind == "pairs" else eval_source(where)
    if not source["pairs"]:
        raise UserError(f"--data {data}: no pairs to review")
    sha256 = HashCache()
    for v in source["videos"]:
        v["sha256"] = sha256(v["file"])
    return source


def _plots(stage: Path, source: Mapping[str, Any]) -> list[dict[str, str]]:
    """The overview's figures, drawn with the dataset's and the report's plot helpers."""
    from videotuna_dpo.pipeline.plots import correlation_heatmap, histogram

    videos, pairs, out = source["videos"], source["pairs"], stage / "plots"
    drawn = []
    if source["kind"] == "pairs":
        scores = [v["values"]["omniscore"] for v in videos if "omniscore" in v["values"]]
        if scores:
            bins = np.arange(np.floor(min(scores) * 100) / 100, max(scores) + 0.02, 0.01)
            drawn.append(("OmniScore of the dataset's videos", histogram(out / "omniscore_hist.png", scores,
                                                                         "OmniScore of the dataset's videos", "OmniScore", bins=bins)))
        for key, title, xlabel, name in (("gap", "OmniScore gap of pairs", "winner - loser", "pair_gap_hist.png"),
                                         ("weight", "Pair weights", "weight", "weight_hist.png")):
            values = [p[key] for p in pairs if isinstance(p.get(key), (int, float))]
            if values:
                drawn.append((title, histogram(out / name, values, title, xlabel)))
        dims = [d for d in _dimensions(videos) if d.startswith("normalized/")]
        if dims:
            columns = {d.removeprefix("normalized/"): [v["values"].get(d, np.nan) for v in videos] for d in dims}
            columns["omniscore"] = [v["values"].get("omniscore", np.nan) for v in videos]
            drawn.append(("Correlation of normalised dimensions",
                          correlation_heatmap(out / "dimension_correlation.png", columns,
                                              "Correlation of normalised dimensions")))
    else:
        from videotuna_dpo.pipeline.report import delta_bars, diff_histogram

        tables = source["tables"]
        for run, table in tables.items():
            drawn.append((f"{run} - base: paired OmniScore differences",
                          diff_histogram(out / f"omniscore_diff_{run}.png", table, run)))
        drawn.append(("Change per dimension", delta_bars(out / "deltas.png", tables)))
    return [{"title": title, "src": os.path.relpath(png, stage)} for title, png in drawn]


def preview_reason(path: str | Path) -> str | None:
    """Why a browser would not show ``path`` as it is (codec, pixel format), or None. An unreadable file gets no
    preview: the page shows that it cannot play it, and a person can reject it."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return None
            ctx = container.streams.video[0].codec_context
            codec, pixels = ctx.name, ctx.pix_fmt
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    if codec not in BROWSER_CODECS:
        return f"codec {codec}"
    if pixels not in BROWSER_PIXEL_FORMATS:
        return f"pixel format {pixels}"
    return None


def write_preview(source: str | Path, target: Path) -> Path:
    """H.264 yuv420p of ``source`` for the page: same frames and rate, small videos enlarged by whole pixels."""
    import torch

    from videotuna_dpo.data.video_io import read_video_and_fps, write_video

    frames, fps = read_video_and_fps(source)  # uint8 [F, C, H, W]
    factor = max(1, math.ceil(PREVIEW_SIDE / min(frames.shape[-2:])))
    if factor > 1:
        factor += factor % 2
        frames = torch.repeat_interleave(torch.repeat_interleave(frames, factor, dim=2), factor, dim=3)
    return write_video(target, frames, fps=max(1, round(fps or 8)))


def _previews(stage: Path, out: Path, source: Mapping[str, Any]) -> int:
    """Write the previews the videos need under ``stage/videos`` (reusing those of the page already in ``out``);
    sets each video's ``media``, the file the page plays. Returns how many videos have one."""
    count = 0
    for v in source["videos"]:
        v["media"] = v["file"]
        reason = preview_reason(v["file"])
        if reason is None:
            continue
        name = Path("videos") / f"{v['sha256'][:24]}.mp4"
        if (out / name).is_file():  # named by the content it shows: still right
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / name, stage / name)
        else:
            write_preview(v["file"], stage / name)
        v["media"], v["preview"] = str(out / name), reason
        count += 1
    return count


def _url(file: str, out: Path) -> str:
    """A relative URL from the page to a video file (the page opened from disk)."""
    rel = os.path.relpath(os.path.realpath(file), os.path.realpath(out))
    return "/".join(quote(part) for part in Path(rel).parts)


def page_data(source: Mapping[str, Any], out: Path, plots: list[dict[str, str]]) -> dict[str, Any]:
    """The ``window.REVIEW`` object of the page."""
    kind, root = source["kind"], Path(source["root"]).resolve()
    identity = hashlib.sha256(f"{kind}\n{root}".encode()).hexdigest()[:16]
    return {
        "kind": kind, "title": source["title"], "dataset": str(root), "storage": f"videotuna-review:{identity}",
        "roles": list(ROLES[kind]), "labels": list(LABELS[kind]), "dimensions": _dimensions(source["videos"]),
        "videos": [{"path": v["path"], "sha256": v["sha256"], "src": _url(v["media"], out), "prompt": v["prompt"],
                    "seed": v["seed"], "values": v["values"]} for v in source["videos"]],
        "pairs": source["pairs"], "plots": plots, "runs": source["runs"],
    }


def _index_html(title: str) -> str:
    template = (ASSETS / "index.html").read_text(encoding="utf-8")
    return template.replace("{{title}}", html.escape(title))


def _check_out(out: Path, source: Mapping[str, Any]) -> None:
    """``--out`` gets plots/ and the page's files replaced: refuse the dataset's own dir or another tool's plots/."""
    if out.resolve() == Path(source["root"]).resolve():
        raise UserError(f"--out {out}: that is the data directory, whose plots/ the page would replace; write the "
                        f"page to its own directory (e.g. review/)")
    if (out / "plots").exists() and not (out / DATA_FILE).exists():
        raise UserError(f"--out {out} holds a plots/ that is not a review page's, which would be replaced; "
                        f"write the page to a new or empty directory")


def write_page(data: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the review page of ``data`` (a preference dataset or an eval report) under ``out``.

    Returns ``{"html": index.html, "kind", "pairs", "videos", "previews", "data": the page data, "files": each
    video's file, "media": the file the page plays for it}``. Files are rendered aside and renamed into place; a
    labels.json already in ``out`` is left alone.
    """
    out = Path(out)
    source = load_source(data)
    _check_out(out, source)
    with atomic_entries(out, PAGE_ENTRIES) as stage:
        previews = _previews(stage, out, source)
        plots = _plots(stage, source)
        for name in ("review.css", "review.js"):
            shutil.copyfile(ASSETS / name, stage / name)
        review = page_data(source, out, plots)
        write_text_atomic(stage / DATA_FILE, "window.REVIEW = " + json.dumps(review, allow_nan=False) + ";\n")
        write_text_atomic(stage / "index.html", _index_html(source["title"]))
    return {"html": str(out / "index.html"), "kind": source["kind"], "pairs": len(source["pairs"]),
            "videos": len(source["videos"]), "previews": previews, "data": review,
            "reasons": sorted({v["preview"] for v in source["videos"] if "preview" in v}),
            "files": [v["file"] for v in source["videos"]], "media": [v["media"] for v in source["videos"]]}
