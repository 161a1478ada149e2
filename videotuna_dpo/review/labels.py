"""labels.json: a person's verdicts on pairs, naming each video by path and content hash (sha256 of the file).

One format for both pages of ``videotuna review``::

    {"format": "videotuna-review-labels", "version": 1, "kind": "pairs", "dataset": "/abs/data/pairs",
     "labels": [{"winner": {"path": ..., "sha256": ...}, "loser": {...}, "prompt": ..., "label": "flip"},
                {"winner": ..., "loser": ..., "label": "reject", "broken": ["loser"]}, ...]}

``kind`` "pairs" labels a preference dataset (roles winner/loser as the scorer chose them; labels keep, flip,
tie, reject); "eval" labels an eval report (roles base/tuned; labels base, tuned, tie, reject). A reject names the
broken video(s) by role. Paths are the ones scores.jsonl records, so labels made on one build of a dataset apply to
a rebuilt one; the hash makes a label for a video that changed since a refusal naming it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from videotuna_dpo.errors import UserError
from videotuna_dpo.user_files import read_json

FORMAT = "videotuna-review-labels"
VERSION = 1
ROLES = {"pairs": ("winner", "loser"), "eval": ("base", "tuned")}
LABELS = {"pairs": ("keep", "flip", "tie", "reject"), "eval": ("base", "tuned", "tie", "reject")}
# The label that says the first / the second role's video is the better one.
PREFERS = {"pairs": {"keep": 0, "flip": 1}, "eval": {"base": 0, "tuned": 1}}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class VideoRef:
    path: str
    sha256: str


@dataclass(frozen=True)
class Label:
    """One verdict: ``refs`` are the videos in the order of ``roles`` (winner, loser or base, tuned)."""

    index: int  # position in the labels list, for messages
    kind: str
    label: str
    refs: tuple[VideoRef, VideoRef]
    broken: tuple[str, ...] = ()  # roles of the broken videos of a reject
    prompt: str = ""
    time: str = ""  # when it was made (ISO 8601, from the page), for the person reading the file

    @property
    def roles(self) -> tuple[str, str]:
        return ROLES[self.kind]

    @property
    def preferred(self) -> VideoRef | None:
        """The video the person judged better (None for a tie or a reject)."""
        i = PREFERS[self.kind].get(self.label)
        return None if i is None else self.refs[i]

    @property
    def broken_refs(self) -> list[VideoRef]:
        return [ref for role, ref in zip(self.roles, self.refs) if role in self.broken]

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {role: {"path": r.path, "sha256": r.sha256} for role, r in zip(self.roles, self.refs)}
        entry.update(prompt=self.prompt, label=self.label)
        if self.broken:
            entry["broken"] = list(self.broken)
        if self.time:
            entry["time"] = self.time
        return entry


@dataclass(frozen=True)
class LabelsFile:
    path: str
    kind: str
    dataset: str
    labels: list[Label]


def parse_entry(entry: Any, kind: str, where: str, index: int = 0) -> Label:
    """One entry of ``labels``, checked; problems raise a UserError that starts with ``where``."""
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: expected an object, got {type(entry).__name__}")
    roles, allowed = ROLES[kind], LABELS[kind]
    refs = []
    for role in roles:
        ref = entry.get(role)
        if not isinstance(ref, Mapping):
            raise UserError(f"{where}.{role}: expected {{\"path\": ..., \"sha256\": ...}} (a {kind} label names "
                            f"its {' and '.join(roles)} videos), got {ref!r}")
        path, sha = ref.get("path"), ref.get("sha256")
        if not isinstance(path, str) or not path:
            raise UserError(f"{where}.{role}.path: expected the video's path, got {path!r}")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise UserError(f"{where}.{role}.sha256: expected 64 lowercase hex digits, got {sha!r}")
        refs.append(VideoRef(path, sha))
    if refs[0].path == refs[1].path:
        raise UserError(f"{where}: {roles[0]} and {roles[1]} are the same video {refs[0].path}")
    label = entry.get("label")
    if label not in allowed:
        raise UserError(f"{where}.label: expected one of {', '.join(allowed)}, got {label!r}")
    broken = entry.get("broken", [])
    if label == "reject":
        if not isinstance(broken, list) or not broken or any(b not in roles for b in broken) or len(set(broken)) != len(broken):
            raise UserError(f"{where}.broken: a reject names its broken video(s): a non-empty list of "
                            f"{' and/or '.join(repr(r) for r in roles)}, got {broken!r}")
    elif broken:
        raise UserError(f"{where}.broken: only a reject names broken videos, this label is {label!r}")
    prompt, time = entry.get("prompt", ""), entry.get("time", "")
    for key, value in (("prompt", prompt), ("time", time)):
        if not isinstance(value, str):
            raise UserError(f"{where}.{key}: expected a string, got {value!r}")
    return Label(index, kind, label, (refs[0], refs[1]), tuple(b for b in roles if b in broken), prompt, time)


def pair_key(label: Label) -> frozenset[str]:
    """The unordered pair of video paths a label is about."""
    return frozenset(r.path for r in label.refs)


def read_labels(path: str | Path, kind: str) -> LabelsFile:
    """Read and check a labels.json of ``kind``; a malformed file, another kind or two labels of one pair is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels {path}: file not found")
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserError(f"{path}: not a labels file of `videotuna review` (expected a JSON object with "
                        f"\"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise UserError(f"{path}: labels format version {doc.get('version')!r}; this videotuna reads version {VERSION}")
    if doc.get("kind") != kind:
        made = {"pairs": "a preference dataset", "eval": "an eval report"}.get(doc.get("kind"), f"kind {doc.get('kind')!r}")
        raise UserError(f"{path}: these labels were made on {made} (\"kind\": {doc.get('kind')!r}), not on "
                        f"{'a preference dataset' if kind == 'pairs' else 'an eval report'}")
    entries = doc.get("labels")
    if not isinstance(entries, list):
        raise UserError(f"{path}: \"labels\" must be a list of labels, got {type(entries).__name__}")
    labels, seen = [], {}
    for i, entry in enumerate(entries):
        label = parse_entry(entry, kind, f"{path}: labels[{i}]", i)
        first = seen.setdefault(pair_key(label), i)
        if first != i:
            a, b = label.refs
            raise UserError(f"{path}: labels[{first}] and labels[{i}] both label the pair {a.path} vs {b.path}; "
                            f"keep one of them")
        labels.append(label)
    dataset = doc.get("dataset", "")
    return LabelsFile(str(path), kind, dataset if isinstance(dataset, str) else "", labels)


def labels_document(kind: str, dataset: str, labels: Iterable[Label]) -> dict[str, Any]:
    """The JSON document of a labels file (what the server writes and the page exports)."""
    return {"format": FORMAT, "version": VERSION, "kind": kind, "dataset": dataset,
            "labels": [label.to_json() for label in labels]}


class HashCache:
    """sha256 of files, each read once."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    def __call__(self, path: str | Path) -> str:
        key = str(path)
        if key not in self._known:
            self._known[key] = file_sha256(path)
        return self._known[key]


def check_identity(labels: LabelsFile, files: Mapping[str, str | Path], what: str,
                   sha256: Callable[[str | Path], str] | None = None) -> None:
    """Every labelled video must be one of ``files`` (its path -> the file to hash) with the labelled content.

    ``what`` names the collection in messages (e.g. ``scores.jsonl``). Labels of which no video is known were made
    for another dataset; a video that changed since it was labelled is refused by name.
    """
    sha256 = sha256 or HashCache()
    refs = [(label, role, ref) for label in labels.labels for role, ref in zip(label.roles, label.refs)]
    if refs and not any(ref.path in files for _, _, ref in refs):
        made = f" (they were made on {labels.dataset})" if labels.dataset else ""
        raise UserError(f"{labels.path}: none of the {len({r.path for _, _, r in refs})} videos its labels name is in "
                        f"{what}: these labels are for another dataset{made}")
    for label, role, ref in refs:
        where = f"{labels.path}: labels[{label.index}] names {role} video {ref.path}"
        if ref.path not in files:
            raise UserError(f"{where}, which is not in {what}; remove that label or give the labels of this dataset")
        try:
            actual = sha256(files[ref.path])
        except OSError as exc:
            raise UserError(f"{where}, which {what} lists but cannot be read ({exc.strerror or exc}): "
                            f"{files[ref.path]}") from None
        if actual != ref.sha256:
            raise UserError(f"{where} with sha256 {ref.sha256[:12]}..., but the file now has {actual[:12]}...: the video "
                            f"changed after it was labelled; label it again (or remove that label)")
