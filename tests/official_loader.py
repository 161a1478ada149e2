"""The official VideoDPO loader's indexing rules (``TextVideo`` / ``TextVideoDPO`` in its ``data/video_data.py``),
written from their behaviour to check that datasets move both ways; no video is decoded.

- ``data_root`` is the path of train_data.yaml; its ``META`` dirs are opened as written (a relative one against
  the working directory).
- The ``metadata.json`` of every META dir, in META order, less each clip whose ``clip_duration`` is under
  ``clip_length`` (1.0 s by default), is the one list that every pair.json's ``video1`` / ``video2`` index.
- A clip opens at ``os.path.join(data_root, os.path.join(meta_dir, clip_path))``: only an absolute path survives
  the join with the yaml's own path.
- ``dupfactor = (0.72 / score) ** dupbeta``, with score 1 when a pair.json row has none, and 1.0 when dupbeta is 0.
- The caption is the pair.json row's ``frame_caption`` (its first item when a list).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class OfficialPair:
    winner: str  # the path the official loader opens
    loser: str
    caption: str
    dupfactor: float


def official_videos(data_root: str, clip_length: float = 1.0) -> list[str]:
    """The clip paths pair.json indices point at, each as the official loader opens it."""
    with open(data_root) as f:
        config = yaml.safe_load(f)
    videos = []
    for meta in config["META"]:
        with open(os.path.join(meta, "metadata.json")) as f:
            for item in json.load(f):
                if item["basic"]["clip_duration"] < clip_length:
                    continue
                videos.append(os.path.join(data_root, os.path.join(meta, item["basic"]["clip_path"])))
    return videos


def official_pairs(data_root: str, clip_length: float = 1.0, dupbeta: float = 1.0) -> list[OfficialPair]:
    """Every pair the official loader trains, in order. A clip that would not open raises FileNotFoundError
    (the official loader prints "Load video failed" and moves on to the next video)."""
    videos = official_videos(data_root, clip_length)
    with open(data_root) as f:
        config = yaml.safe_load(f)
    pairs = []
    for meta in config["META"]:
        with open(os.path.join(meta, "pair.json")) as f:
            rows = json.load(f)
        for row in rows:
            winner, loser = videos[row["video1"]], videos[row["video2"]]
            for path in (winner, loser):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"the official loader cannot open {path}")
            caption = row["frame_caption"]
            caption = caption[0] if isinstance(caption, list) else caption
            factor = (0.72 / row.get("score", 1)) ** dupbeta if dupbeta else 1.0
            pairs.append(OfficialPair(winner, loser, caption, factor))
    return pairs
