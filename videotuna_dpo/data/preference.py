"""The official VideoDPO preference layout: train_data.yaml -> META dirs -> metadata.json + pair.json.

Indices in pair.json are local to their dir. Everything is validated before training starts; a
problem is reported with the dir, the pair row and what is wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import write_json_atomic, write_text_atomic
from videotuna_dpo.user_files import read_json, read_yaml

OFFICIAL_WEIGHT_BETA = 0.72  # weight = (0.72 / p) ** alpha, p = the pair probability in pair.json
OFFICIAL_MISSING_SCORE = 1.0  # the official loader's pair score when pair.json has none: weight 0.72 ** alpha
OFFICIAL_CLIP_LENGTH = 1.0  # seconds; the official loader drops shorter clips before it indexes pair.json
OFFICIAL_TRAIN_DATA = "train_data_official.yaml"  # META dirs absolute, for the official loader
MAX_LISTED_PROBLEMS = 20
HUMAN_ORIGINS = ("human-confirmed", "human-flipped")  # manifest pair origins that data.human_weight up-weights


class DataError(UserError):
    """A preference dataset is malformed; the message lists every problem found (dir, row, what)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{len(problems)} problem(s) in the preference data:\n  " + "\n  ".join(shown) + more)


@dataclass(frozen=True)
class PairRecord:
    """One preference pair, resolved to files."""

    meta_dir: str
    row: int
    winner: str  # video file path
    loser: str
    caption: str
    score: float | None  # pair.json `score` (the pair probability), when present
    weight: float

    @property
    def pair_id(self) -> str:
        return f"{self.meta_dir}#{self.row}"


def _load_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        problems.append(f"{path}: file not found")
        return None
    try:
        return read_json(path)
    except UserError as exc:
        problems.append(str(exc))
        return None


def resolve_meta_dir(entry: str, train_data: Path) -> Path | str:
    """A relative ``META`` dir: against the yaml's folder (ours), else the working directory (the official
    configs, e.g. ``dataset/vidpro10k-vc2-dataset``); a problem line naming both when neither exists."""
    d = Path(entry)
    if d.is_absolute():
        return d
    candidates = [train_data.parent / d, Path.cwd() / d]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return (f"{train_data}: META dir {entry} not found, neither relative to the yaml's folder "
            f"({candidates[0]}) nor to the working directory ({candidates[1]})")


def meta_dirs(train_data: str | Path) -> list[Path]:
    """The ``META`` dirs of a train_data.yaml (relative ones: the yaml's folder first, then the working directory)."""
    train_data = Path(train_data)
    if not train_data.is_file():
        raise DataError([f"{train_data}: train_data.yaml not found"])
    try:
        doc = read_yaml(train_data)
    except UserError as exc:
        raise DataError([str(exc)]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("META"), list) or not doc["META"]:
        raise DataError([f"{train_data}: expected a mapping with a non-empty list `META: [dir, ...]`"])
    dirs, seen, problems = [], {}, []
    for i, entry in enumerate(doc["META"]):
        d = resolve_meta_dir(str(entry), train_data)
        if isinstance(d, str):
            problems.append(d)
            continue
        key = d.resolve()
        if key in seen:
            problems.append(f"{train_data}: META[{i}] {entry} is listed twice (also META[{seen[key]}])")
            continue
        seen[key] = i
        dirs.append(d)
    if problems:
        raise DataError(problems)
    return dirs


def _caption(value: Any) -> str:
    if isinstance(value, list):
        value = value[0] if value else ""
    return value.strip() if isinstance(value, str) else ""


def load_pairs(
    train_data: str | Path,
    weights: str = "auto",
    alpha: float = 1.0,
    check_files: bool = True,
    human_weight: float = 1.0,
) -> list[PairRecord]:
    """Read and validate every pair of a train_data.yaml.

    ``weights``: ``"none"`` (all ones), ``"manifest"`` (manifest.json's per-pair weights),
    ``"pair_score"`` ((0.72 / score) ** alpha, the official ``dupfactor``; a row without ``score`` counts as
    score 1, as there), ``"auto"`` (manifest when every dir has one, else ones). ``human_weight`` multiplies the
    weight of every pair a person confirmed or flipped (manifest ``origin``, from ``pairs --labels``).
    """
    if weights not in ("auto", "none", "manifest", "pair_score"):
        raise UserError(f"data.weights must be auto, none, manifest or pair_score, got {weights!r}")
    problems: list[str] = []
    records: list[PairRecord] = []
    # A pair listed twice is refused, not warned about: the repeat would silently double its weight, which the pair
    # weights (manifest, pair_score) exist to set; the layout likewise refuses a video or META dir listed twice.
    first_row: dict[tuple[Path, Path, str], str] = {}
    dirs = meta_dirs(train_data)
    use_manifest = weights == "manifest" or (weights == "auto" and all((d / "manifest.json").is_file() for d in dirs))
    weighting = _Weighting(weights, alpha, use_manifest, human_weight)
    for d in dirs:
        records.extend(_dir_pairs(d, weighting, check_files, first_row, problems))
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{train_data}: no preference pairs"])
    return records


@dataclass(frozen=True)
class _Weighting:
    """How :func:`load_pairs` weighs a pair: ``data.weights``, ``data.alpha``, whether the manifests give the
    weights, and ``data.human_weight``."""

    mode: str
    alpha: float
    use_manifest: bool
    human_weight: float


def _dir_pairs(d: Path, weighting: _Weighting, check_files: bool, first_row: dict,
               problems: list[str]) -> list[PairRecord]:
    """The pairs of one META dir (metadata.json, pair.json, manifest.json); problems go to ``problems``."""
    metadata = _load_json(d / "metadata.json", problems)
    pairs = _load_json(d / "pair.json", problems)
    if metadata is None or pairs is None:
        return []
    if not isinstance(metadata, list) or not isinstance(pairs, list):
        problems.append(f"{d}: metadata.json and pair.json must each hold a JSON list")
        return []
    manifest_weights, human = _manifest_rows(d, len(pairs), weighting, problems)
    paths = _clip_paths(d, metadata, problems)
    records = []
    for row, pair in enumerate(pairs):
        where = f"{d}/pair.json row {row}"
        found = _pair_row(where, pair, paths, first_row, check_files, problems)
        if found is None:
            continue
        winner, loser, caption, score = found
        weight = _row_weight(where, score, manifest_weights, row, weighting, problems)
        if weight is None:
            continue
        if human[row]:
            weight *= weighting.human_weight
        if caption:
            records.append(PairRecord(str(d), row, str(winner), str(loser), caption,
                                      None if score is None else float(score), float(weight)))
    return records


def _manifest_rows(d: Path, rows_in_pair_json: int, weighting: _Weighting,
                   problems: list[str]) -> tuple[list[Any] | None, list[bool]]:
    """manifest.json's per-row weights (None unless the manifests give the weights) and which rows a person
    confirmed or flipped (its ``origin``); read only when one of the two is needed."""
    manifest_weights = None
    human = [False] * rows_in_pair_json
    if weighting.use_manifest or (weighting.human_weight != 1.0 and (d / "manifest.json").is_file()):
        manifest = _load_json(d / "manifest.json", problems)
        rows = manifest.get("pairs") if isinstance(manifest, dict) else None
        if manifest is not None and not (isinstance(rows, list) and all(isinstance(p, dict) for p in rows)):
            got = "an object without one" if isinstance(manifest, dict) else f"a JSON {type(manifest).__name__}"
            problems.append(f"{d}/manifest.json: expected a JSON object with a \"pairs\" list of objects, one "
                            f"per pair.json row (as `videotuna pairs` writes it), got {got}")
        elif manifest is not None and len(rows) != rows_in_pair_json:
            problems.append(f"{d}/manifest.json: {len(rows)} pair weights for {rows_in_pair_json} rows of pair.json")
        elif manifest is not None:
            if weighting.use_manifest:
                manifest_weights = [p.get("weight") for p in rows]
            human = [p.get("origin") in HUMAN_ORIGINS for p in rows]
    return manifest_weights, human


def _clip_paths(d: Path, metadata: list[Any], problems: list[str]) -> list[Path | None]:
    """Each metadata.json row's video path (relative ones under ``d``), None for a row without one."""
    paths: list[Path | None] = []
    seen_clips: dict[str, int] = {}
    for i, item in enumerate(metadata):
        clip = item.get("basic", {}).get("clip_path") if isinstance(item, dict) else None
        if not isinstance(clip, str) or not clip:
            problems.append(f"{d}/metadata.json row {i}: missing basic.clip_path")
            paths.append(None)
            continue
        if clip in seen_clips:
            problems.append(f"{d}/metadata.json row {i}: duplicate video {clip} (also row {seen_clips[clip]})")
        seen_clips[clip] = i
        paths.append(Path(clip) if Path(clip).is_absolute() else d / clip)
    return paths


def _pair_row(where: str, pair: Any, paths: list[Path | None], first_row: dict, check_files: bool,
              problems: list[str]) -> tuple[Path, Path, str, Any] | None:
    """One pair.json row -> (winner, loser, caption, score), or None when it cannot be a pair (problems said why).

    An empty caption is a problem but still returned as ``""``: the row is checked to the end, then left out.
    """
    if not isinstance(pair, dict):
        problems.append(f"{where}: not a JSON object")
        return None
    idx = []
    for key in ("video1", "video2"):
        v = pair.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            problems.append(f"{where}: {key} must be an integer index, got {v!r}")
        elif not 0 <= v < len(paths):
            problems.append(f"{where}: {key}={v} out of range (metadata.json has {len(paths)} entries)")
        else:
            idx.append(v)
    caption = _caption(pair.get("frame_caption"))
    if not caption:
        problems.append(f"{where}: empty caption (frame_caption)")
    score = pair.get("score")
    if score is not None and (not isinstance(score, (int, float)) or not math.isfinite(score)):
        problems.append(f"{where}: score {score!r} is not a finite number")
        return None
    if len(idx) != 2:
        return None
    if idx[0] == idx[1]:
        problems.append(f"{where}: winner and loser are the same video (index {idx[0]})")
        return None
    winner, loser = paths[idx[0]], paths[idx[1]]
    if winner is None or loser is None:
        return None
    same = first_row.setdefault((winner.resolve(), loser.resolve(), caption), where)
    if same != where:
        problems.append(f"{where}: the same pair as {same} (winner, loser and caption); a pair listed twice "
                        f"trains twice: remove the repeat (pair weights, not repeats, set how much a pair counts)")
        return None
    if check_files:
        bad = [p for p in (winner, loser) if not p.is_file()]
        if bad:
            problems.append(f"{where}: video file(s) not found: {', '.join(map(str, bad))}")
            return None
    return winner, loser, caption, score


def _row_weight(where: str, score: Any, manifest_weights: list[Any] | None, row: int, weighting: _Weighting,
                problems: list[str]) -> float | None:
    """Row ``row``'s weight before ``human_weight``: the manifest's (when the manifests give the weights), the
    official ``pair_score`` one, or 1; None when it is not a finite non-negative number (problems say so)."""
    weight = 1.0
    if manifest_weights is not None:
        weight = manifest_weights[row]
    elif weighting.mode == "pair_score" and weighting.alpha != 0:  # alpha 0: the official loader never reads score
        # The official loader weighs a row without a score as score 1; a dataset of its scripts trains the same here.
        prob = OFFICIAL_MISSING_SCORE if score is None else score
        if prob <= 0:
            problems.append(f"{where}: data.weights=pair_score needs a positive score, got {score!r}")
            return None
        weight = (OFFICIAL_WEIGHT_BETA / float(prob)) ** weighting.alpha
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        problems.append(f"{where}: weight {weight!r} is not a finite non-negative number")
        return None
    return weight


def write_official_layout(
    meta_dir: str | Path,
    clips: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    manifest: dict[str, Any] | None = None,
    final_meta_dir: str | Path | None = None,
) -> Path:
    """Write one META dir (metadata.json, pair.json, optional manifest.json) and, beside it, train_data.yaml
    (``META`` relative: the dataset moves as a whole) and train_data_official.yaml (``META`` absolute).

    ``clips``: ``{"clip_path", "caption", "duration"}``; ``pairs``: ``{"winner", "loser", "caption",
    "score"}`` with indices into ``clips``. ``final_meta_dir``: where ``meta_dir`` will live when it is
    staged elsewhere (default: ``meta_dir``). The official loader reads train_data_official.yaml from any
    working directory: it opens ``META`` dirs as given, and each video at ``os.path.join(<yaml path>,
    os.path.join(meta_dir, clip_path))``, which only an absolute ``META`` dir survives.
    """
    meta_dir = Path(meta_dir)
    final = os.path.abspath(final_meta_dir) if final_meta_dir is not None else os.path.realpath(meta_dir)
    metadata = [
        {"basic": {"clip_path": c["clip_path"], "clip_duration": float(c.get("duration", 0.0))},
         "misc": {"frame_caption": [c["caption"]]}}
        for c in clips
    ]
    pair_rows = [
        {"video1": int(p["winner"]), "video2": int(p["loser"]), "frame_caption": p["caption"], "score": float(p["score"])}
        for p in pairs
    ]
    write_json_atomic(meta_dir / "metadata.json", metadata)
    write_json_atomic(meta_dir / "pair.json", pair_rows)
    if manifest is not None:
        write_json_atomic(meta_dir / "manifest.json", manifest)
    train_data = meta_dir.parent / "train_data.yaml"
    write_text_atomic(train_data, yaml.safe_dump({"META": [meta_dir.name]}))
    write_text_atomic(meta_dir.parent / OFFICIAL_TRAIN_DATA, yaml.safe_dump({"META": [final]}))
    return train_data
