"""Small preference datasets in the official VideoDPO layout, written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from videotuna_dpo.data.video_io import write_video


def moving_square(frames: int = 9, size: int = 32, color=(255, 0, 0), step: int = 2, jitter: bool = False, seed: int = 0) -> torch.Tensor:
    """uint8 [F, 3, size, size]: a square crossing the frame (jittering when asked)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.zeros(frames, 3, size, size, dtype=torch.uint8)
    for f in range(frames):
        x = 2 + f * step + (int(torch.randint(-4, 5, (1,), generator=g)) if jitter else 0)
        x = max(0, min(size - 8, x))
        for c in range(3):
            video[f, c, 12:20, x : x + 8] = color[c]
    return video


def write_official_dataset(root: Path, captions: list[str], frames: int = 9, size: int = 32, dirs: int = 1) -> Path:
    """Per caption a clean (winner) and a jittering (loser) video; returns train_data.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    meta_names = []
    for d in range(dirs):
        meta = root / f"part{d}"
        (meta / "videos").mkdir(parents=True, exist_ok=True)
        metadata, pairs = [], []
        for i, caption in enumerate(captions):
            for kind, jitter in (("good", False), ("bad", True)):
                name = f"videos/{d}_{i}_{kind}.mp4"
                write_video(meta / name, moving_square(frames, size, jitter=jitter, seed=i), lossless=True)
                metadata.append({"basic": {"clip_path": name, "clip_duration": frames / 8}, "misc": {"frame_caption": [caption]}})
            pairs.append({"video1": 2 * i, "video2": 2 * i + 1, "frame_caption": caption, "score": 0.5})
        (meta / "metadata.json").write_text(json.dumps(metadata))
        (meta / "pair.json").write_text(json.dumps(pairs))
        meta_names.append(meta.name)
    path = root / "train_data.yaml"
    path.write_text(yaml.safe_dump({"META": meta_names}))
    return path


# The review tests' toy dataset: per caption 3 samples of the toy world (a clean render and two flawed takes).
REVIEW_TAKES = ((None, 0.90), ("static", 0.70), ("flicker", 0.55))


def write_toy_scores(root: Path, captions: list[str], frames: int = 16, takes=REVIEW_TAKES, lossless: bool = False) -> Path:
    """Toy-world videos under ``root/samples`` and the scores.jsonl `videotuna score` would write for them.

    ``lossless``: RGB H.264 as the demo writes it (browsers need a preview of it), else yuv420p.
    Caption i's take k has OmniScore ``base - 0.01 * i`` (distinct bins); the dimensions follow the flaw:
    ``static`` has no dynamic degree, ``flicker`` a low temporal flickering score.
    """
    from videotuna_dpo.toy.world import parse_caption, render

    lines = []
    for i, caption in enumerate(captions):
        for k, (flaw, base) in enumerate(takes):
            video = root / "samples" / f"p{i}_s{k}.mp4"
            write_video(video, render(parse_caption(caption), frames=frames, flaw=flaw, seed=i), fps=8, lossless=lossless)
            omni = round(base - 0.01 * i, 4)
            normalized = {"temporal_flickering": 0.4 if flaw == "flicker" else 0.95,
                          "dynamic_degree": 0.0 if flaw == "static" else 1.0,
                          "motion_smoothness": round(0.9 - 0.05 * k, 4), "toy_alignment": round(omni, 4)}
            lines.append(json.dumps({
                "path": str(video.resolve()), "status": "ok", "prompt": caption, "omniscore": omni,
                "quality": round(omni + 0.01, 4), "semantic": round(omni - 0.01, 4), "normalized": normalized,
                "raw": {k2: v for k2, v in normalized.items()}, "frames": frames, "fps": 8.0,
                "meta": {"prompt_id": f"p{i}", "sample": k, "seed": 100 * i + k}}))
    scores = root / "scores.jsonl"
    scores.write_text("\n".join(lines) + "\n")
    return scores


def write_toy_eval_report(report: Path, captions: list[str], frames: int = 16) -> Path:
    """An eval report laid out as `videotuna eval` writes it (samples/, scores/, report.json) for toy videos.

    Per caption one seed: the base sample flickers, the tuned one (run ``run``) is clean, except caption 1's,
    where the tuned sample is static and scores lower than the base.
    """
    from videotuna_dpo.pipeline.evaluate import compare_scores
    from videotuna_dpo.pipeline.report import write_report
    from videotuna_dpo.toy.world import parse_caption, render

    files = {}
    for label in ("base", "run"):
        lines = []
        for i, caption in enumerate(captions):
            flaw = "flicker" if label == "base" else ("static" if i == 1 else None)
            omni = {"flicker": 0.6, "static": 0.5, None: 0.8}[flaw] - 0.01 * i
            video = report / "samples" / label / f"p{i}_s0.mp4"
            write_video(video, render(parse_caption(caption), frames=frames, flaw=flaw, seed=i), fps=8)
            normalized = {"temporal_flickering": 0.4 if flaw == "flicker" else 0.95,
                          "dynamic_degree": 0.0 if flaw == "static" else 1.0}
            lines.append(json.dumps({"path": str(video.resolve()), "status": "ok", "prompt": caption, "omniscore": omni,
                                     "quality": omni, "semantic": omni, "normalized": normalized, "raw": normalized,
                                     "frames": frames, "meta": {"prompt_id": f"p{i}", "sample": 0, "seed": 1000 + i}}))
        files[label] = report / "scores" / f"{label}.jsonl"
        files[label].parent.mkdir(parents=True, exist_ok=True)
        files[label].write_text("\n".join(lines) + "\n")
    write_report(report, {"tables": {"run": compare_scores(files["base"], files["run"])}, "settings": {"seed": 1000}})
    return report
