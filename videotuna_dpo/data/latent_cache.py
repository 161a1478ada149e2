"""The latent cache: every video's VAE posterior and every caption's embedding, encoded once.

Layout of a cache directory: ``shard-00000.safetensors``... (tensors ``v/<n>/mean``,
``v/<n>/std`` ``[F', C', H', W']`` and ``c/<n>`` ``[L, D]``) and ``index.json`` mapping video ids
and captions to shard keys, with the settings the cache was built at. Shards and the index are
written atomically, one shard at a time, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from videotuna_dpo.data.frames import fit_stride, frame_indices, resize_center_crop, to_model_range
from videotuna_dpo.data.order import generator, item_key
from videotuna_dpo.data.preference import PairRecord, load_pairs
from videotuna_dpo.fileio import atomic_file, write_json_atomic
from videotuna_dpo.jobs import Launch, Progress, is_main_process, rank_share, run_job
from videotuna_dpo.data.video_io import VideoReadError, read_video
from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.user_files import read_json

INDEX = "index.json"
CACHE_VERSION = 1
STORE_DTYPE = torch.float16
REENCODE = "run `videotuna cache` with the same --data and --out to encode what it held again"


def resolve_train_data(data: str | Path) -> Path:
    """A dataset dir (holding train_data.yaml) or the yaml itself -> the yaml."""
    data = Path(data)
    return data / "train_data.yaml" if data.is_dir() else data


NULL_CAPTION = ""  # always cached: caption dropout (dpo.uncond_prob) trains on its embedding


def base_weights(model_cfg: Any) -> str:
    """The checkpoint latents and prompt embeddings come from: ``model.pretrained`` or ``model.ckpt`` (VC2).

    Paths are made absolute; a name that is not a path (the toy's ``builtin``) is kept as it is.
    """
    value = model_cfg.get("pretrained") or model_cfg.get("ckpt") or ""
    path = Path(str(value))
    return str(path.resolve()) if value and path.exists() else str(value)


def cache_settings(model_cfg: Any, data_cfg: Any) -> dict[str, Any]:
    """What a cache depends on; a cache built with other settings is refused."""
    return {
        "backend": str(model_cfg.name),
        "pretrained": base_weights(model_cfg),
        "resolution": [int(x) for x in data_cfg.resolution],
        "video_length": int(data_cfg.video_length),
        "frame_stride": int(data_cfg.frame_stride),
        "frame_start": 0,
    }


def video_id(path: str | Path) -> str:
    return str(Path(path).resolve())


def _load_index(out: Path) -> dict[str, Any] | None:
    path = out / INDEX
    if not path.is_file():
        return None
    index = read_json(path)  # bounded, and malformed JSON is named
    if not isinstance(index, dict) or not isinstance(index.get("videos"), dict):
        raise UserError(f"{path}: not a latent-cache index (expected an object with videos, captions and shards); "
                        f"rebuild it with `videotuna cache`")
    return index


def _check_shard_names(index: dict[str, Any], where: Path) -> None:
    """Every shard the index names is a plain file name listed in ``shards``: nothing outside the cache dir is opened."""
    shards = index.get("shards", [])
    named = [e.get("shard") if isinstance(e, dict) else None
             for kind in ("videos", "captions") for e in index.get(kind, {}).values()]
    for name in [*shards, *named]:
        if not isinstance(name, str) or name in ("", ".", "..") or PurePosixPath(name).name != name or "\\" in name:
            raise UserError(f"{where / INDEX}: shard name {name!r} is not a plain file name inside the cache "
                            f"directory (like shard-00000.safetensors); rebuild the cache with `videotuna cache`")
        if name not in shards:
            raise UserError(f"{where / INDEX}: an entry points at shard {name!r}, which the index does not list; "
                            f"rebuild the cache with `videotuna cache`")


def _shard_error(cache_dir: Path, shard: str, why: str) -> UserError:
    return UserError(f"latent cache {cache_dir}: shard {cache_dir / shard} is unreadable ({why}); {REENCODE}")


def _unreadable_shards(index: dict[str, Any], cache_dir: Path) -> dict[str, str]:
    """The shards of ``index`` that are missing, corrupt or lack a key the index puts in them -> why."""
    keys: dict[str, set[str]] = {s: set() for s in index.get("shards", [])}
    for entry in index.get("captions", {}).values():
        keys[entry["shard"]].add(entry["key"])
    for entry in index.get("videos", {}).values():
        keys[entry["shard"]].update((entry["key"] + "/mean", entry["key"] + "/std"))
    bad = {}
    for shard, needed in keys.items():
        try:
            with safe_open(str(cache_dir / shard), framework="pt") as handle:
                missing = sorted(needed - set(handle.keys()))
        except (SafetensorError, OSError) as exc:
            bad[shard] = first_line(exc)
            continue
        if missing:
            bad[shard] = f"lacks {len(missing)} tensor(s) the index names, e.g. {missing[0]}"
    return bad


def check_settings(index: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Refuse a cache whose settings differ, naming each setting that does."""
    built = index.get("settings", {})
    diffs = [f"{k}: cache has {built.get(k)!r}, config has {v!r}" for k, v in expected.items() if built.get(k) != v]
    if diffs:
        raise UserError(f"latent cache {where} was built with other settings ({'; '.join(diffs)}); "
                        f"build a new cache with `videotuna cache` or use the matching config")


def _save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata)


def _clip(path: str, data_cfg: Any) -> torch.Tensor:
    """First ``video_length`` frames at ``frame_stride`` -> ``[C, F, H, W]`` in [-1, 1]."""
    frames = read_video(path)
    stride = fit_stride(frames.shape[0], data_cfg.video_length, data_cfg.frame_stride, path)
    idx = frame_indices(data_cfg.video_length, stride, 0)
    x = resize_center_crop(frames[idx], *[int(v) for v in data_cfg.resolution])
    return to_model_range(x).permute(1, 0, 2, 3)


SHARD = re.compile(r"shard-(\d+)\.safetensors")


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _adopt_orphans(index: dict[str, Any], out: Path, digest: str) -> list[str]:
    """Shards a killed job wrote but no index names yet: their entries join ``index`` (in memory); their names."""
    adopted = []
    for path in sorted(out.glob("shard-*.safetensors")):
        if not SHARD.fullmatch(path.name) or path.name in index["shards"]:
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                held = set(handle.keys())
            held_meta = json.loads(meta["cache"])
            entries = held_meta["entries"]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError):
            continue  # half a shard, or one of a build before shards named their entries: written again
        if held_meta.get("settings") != digest or any(k + s not in held for k in entries["videos"].values()
                                                 for s in ("/mean", "/std")):
            continue
        _apply_group(index, path.name, entries)
        adopted.append(path.name)
    return adopted


def _apply_group(index: dict[str, Any], shard: str | None, entries: dict[str, dict[str, str]]) -> None:
    """Record one group's shard (its videos and captions) and the videos it could not encode in ``index``."""
    index["skipped"].update(entries.get("skipped", {}))
    if shard is None:
        return
    for kind in ("videos", "captions"):
        for key, tensor_key in entries[kind].items():
            index[kind][key] = {"shard": shard, "key": tensor_key}
    for key in entries["videos"]:
        index["skipped"].pop(key, None)
    index["shards"].append(shard)


def _canonical(index: dict[str, Any], order: dict[str, int]) -> dict[str, Any]:
    """``index`` in one order whatever order its shards were written in: shards by name, entries by shard and
    tensor key, skipped videos in the dataset's order."""
    shards = sorted(index["shards"], key=lambda name: (int(SHARD.fullmatch(name)[1]) if SHARD.fullmatch(name) else -1, name))
    at = {name: i for i, name in enumerate(shards)}

    def entry_order(item: tuple[str, dict[str, str]]) -> tuple[int, int]:
        return at.get(item[1]["shard"], -1), int(item[1]["key"].split("/")[1])

    return {**index, "shards": shards,
            "videos": dict(sorted(index["videos"].items(), key=entry_order)),
            "captions": dict(sorted(index["captions"].items(), key=entry_order)),
            "skipped": dict(sorted(index["skipped"].items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))}


class _Groups(Dataset):
    """Group ``g`` of the build, its videos decoded (in a DataLoader worker): ``(g, captions, [(path, clip or
    None, reason or None)])`` with clips ``[C, F, H, W]`` in [-1, 1]."""

    def __init__(self, groups: list[tuple[int, list[str], list[str]]], data_cfg: Any):
        self.groups, self.data_cfg = groups, data_cfg

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[int, list[str], list[tuple[str, Any, str | None]]]:
        g, captions, videos = self.groups[i]
        decoded = []
        for path in videos:
            try:
                decoded.append((path, _clip(path, self.data_cfg), None))
            except (VideoReadError, UserError) as exc:
                decoded.append((path, None, exc.reason if isinstance(exc, VideoReadError) else str(exc)))
        return g, captions, decoded


def _as_is(batch: Any) -> Any:
    return batch


def build_cache(model_cfg: Any, data_cfg: Any, backend: Any, data: str | Path, out: str | Path,
                shard_size: int = 32, batch_size: int = 4, launch: Any = None) -> dict[str, Any]:
    """Encode what the cache at ``out`` lacks; unreadable videos are skipped and recorded.

    The work is split in groups (one shard each: the captions and the first videos, then ``shard_size`` videos
    rounded up to whole batches); on several processes (``launch``) group g is rank g mod world's, and rank 0
    indexes the shards at the end: the cache is the same bytes for any number of processes, and a killed build
    resumes on any number (a shard its index does not name yet is taken up by the next build).
    """
    launch = launch or Launch()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_data = resolve_train_data(data)
    pairs = load_pairs(train_data, weights="none")
    settings = cache_settings(model_cfg, data_cfg)
    index = _load_index(out) or {"version": CACHE_VERSION, "settings": settings, "train_data": str(train_data.resolve()),
                                 "videos": {}, "captions": {}, "skipped": {}, "shards": []}
    check_settings(index, settings, out)
    _check_shard_names(index, out)
    for shard, why in _unreadable_shards(index, out).items():
        if is_main_process():
            print(f"{out / shard}: unreadable ({why}); encoding what it held again", file=sys.stderr)
        _forget_shard(index, shard)
    digest = _digest(settings)
    videos = list(OrderedDict.fromkeys(p for pair in pairs for p in (pair.winner, pair.loser)))
    order = {video_id(v): i for i, v in enumerate(videos)}
    captions = list(OrderedDict.fromkeys([NULL_CAPTION] + [pair.caption for pair in pairs]))
    # Videos skipped by a finished build are tried again: the file may have been fixed (or replaced) since.
    retried = set(index["skipped"])
    adopted = _adopt_orphans(index, out, digest)
    kept = sum(1 for v in videos if video_id(v) in index["videos"])
    todo_videos = [v for v in videos if video_id(v) not in index["videos"]
                   and (video_id(v) in retried or video_id(v) not in index["skipped"])]
    todo_captions = [c for c in captions if c not in index["captions"]]
    summary = {"videos": len(videos), "encoded": 0, "skipped_now": 0, "kept": kept}

    per_group = max(1, -(-int(shard_size) // batch_size)) * batch_size  # a shard is written after whole batches
    chunks = [todo_videos[i : i + per_group] for i in range(0, len(todo_videos), per_group)] or ([[]] if todo_captions else [])
    taken, names = set(index["shards"]) | set(p.name for p in out.glob("shard-*.safetensors") if p.name in adopted), []
    count = len(index["shards"])
    for _ in chunks:  # the names a one-process build gives its shards, in order
        while f"shard-{count:05d}.safetensors" in taken:
            count += 1
        names.append(f"shard-{count:05d}.safetensors")
        taken.add(names[-1])
        count += 1
    groups = [(g, todo_captions if g == 0 else [], chunk) for g, chunk in enumerate(chunks)]
    results: list[tuple[int, str | None, dict[str, Any]]] = []  # this rank's groups
    one_process = launch.resolved() == (1, 1)

    def step(group: tuple[int, list[str], list[tuple[str, Any, str | None]]]) -> None:
        g, group_captions, decoded = group
        pending: dict[str, torch.Tensor] = {}
        entries: dict[str, dict[str, str]] = {"videos": {}, "captions": {}, "skipped": {}}
        for start in range(0, len(group_captions), batch_size):
            chunk = group_captions[start : start + batch_size]
            embeds = backend.encode_prompt(chunk).to(STORE_DTYPE).cpu()  # [B, L, D]
            for caption, e in zip(chunk, embeds):
                n = len(pending)
                pending[f"c/{n}"] = e
                entries["captions"][caption] = f"c/{n}"
        for start in range(0, len(decoded), batch_size):
            paths, clips = [], []
            for path, clip, reason in decoded[start : start + batch_size]:
                if reason is not None:
                    entries["skipped"][video_id(path)] = reason
                    print(f"skipped {path}: {reason}", file=sys.stderr)
                    continue
                paths.append(path)
                clips.append(clip)
            if clips:
                mean, std = backend.latent_distribution(torch.stack(clips).to(_device(backend)))
                for path, m, s in zip(paths, mean.to(STORE_DTYPE).cpu(), std.to(STORE_DTYPE).cpu()):
                    n = len(pending)
                    pending[f"v/{n}/mean"], pending[f"v/{n}/std"] = m, s
                    entries["videos"][video_id(path)] = f"v/{n}"
        shard = None
        if pending:
            shard = names[g]
            # One metadata key: safetensors writes its metadata map in no fixed order, and a shard must be the
            # same bytes whichever process wrote it.
            _save_shard(out / shard, pending, {"cache": json.dumps({"entries": entries, "settings": digest})})
        results.append((g, shard, entries))
        if one_process:  # the index follows every shard (several processes: rank 0 indexes them at the end)
            _apply_group(index, shard, entries)
            write_json_atomic(out / INDEX, _canonical(index, order))  # the shard exists before the index names it

    def loader(rank: int, world: int) -> DataLoader:
        return DataLoader(_Groups(rank_share(groups, rank, world), data_cfg), batch_size=None, collate_fn=_as_is,
                          num_workers=launch.num_workers if todo_videos else 0)

    def done_items() -> int:
        done = 0
        for path in out.glob("shard-*.safetensors"):
            if path.name in names:
                with safe_open(str(path), framework="pt") as handle:
                    entries = json.loads((handle.metadata() or {}).get("cache", "{}")).get("entries", {})
                done += len(entries.get("videos", {})) + len(entries.get("captions", {})) + len(entries.get("skipped", {}))
        return done

    total = len(todo_videos) + len(todo_captions)
    if groups:
        ranks = run_job(launch, step, loader, Progress(total, 0, done_items, desc="cache", unit="item"))
        gathered = sorted(r for rank_results in ranks.gather(results) for r in rank_results)
    else:
        gathered = []
    if not one_process:
        for _, shard, entries in gathered:
            _apply_group(index, shard, entries)
    for _, _, entries in gathered:
        summary["encoded"] += len(entries["videos"])
        summary["skipped_now"] += len(entries["skipped"])
    if is_main_process():
        write_json_atomic(out / INDEX, _canonical(index, order))
    summary.update(skipped_total=len(index["skipped"]), shards=len(index["shards"]),
                   bytes=sum((out / s).stat().st_size for s in index["shards"]))
    return summary


def _forget_shard(index: dict[str, Any], shard: str) -> None:
    """Remove ``shard`` and every entry in it from ``index``, so a build encodes those items again."""
    index["shards"].remove(shard)
    for kind in ("videos", "captions"):
        index[kind] = {k: e for k, e in index[kind].items() if e["shard"] != shard}


def _device(backend: Any) -> torch.device:
    try:
        return next(backend.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class CachedPreferenceDataset(Dataset):
    """Pairs from the cache: a fresh posterior sample per access, as training from pixels draws one."""

    def __init__(self, cache_dir: Path, index: dict[str, Any], pairs: list[PairRecord]):
        self.cache_dir = cache_dir
        self.index = index
        self.pairs = pairs
        self.seed = 0
        self._handles: dict[str, Any] = {}
        # dpo.precompute_reference: per pair K draws (``seed`` [N, K]; once computed also ``t``, ``drop``, ``ref_err``)
        self.draws: dict[str, torch.Tensor] | None = None

    def attach_draws(self, draws: dict[str, torch.Tensor]) -> None:
        """Items then carry draw ``epoch mod K`` of their pair: its seed decides the posterior sample (and the noise)."""
        if draws["seed"].shape[0] != len(self.pairs):
            raise ValueError(f"draws for {draws['seed'].shape[0]} pairs, the dataset has {len(self.pairs)}")
        self.draws = draws

    @classmethod
    def open(cls, data_cfg: Any) -> "CachedPreferenceDataset":
        cache_dir = Path(data_cfg.cache)
        index = _load_index(cache_dir)
        if index is None:
            raise UserError(f"data.cache={cache_dir}: no {INDEX}; build it with `videotuna cache`")
        expected = {k: v for k, v in index.get("settings", {}).items() if k in ("backend", "pretrained")}
        expected.update({"resolution": [int(x) for x in data_cfg.resolution], "video_length": int(data_cfg.video_length),
                         "frame_stride": int(data_cfg.frame_stride), "frame_start": 0})
        check_settings(index, expected, cache_dir)
        _check_shard_names(index, cache_dir)
        bad = _unreadable_shards(index, cache_dir)
        if bad:
            shard, why = next(iter(bad.items()))
            raise _shard_error(cache_dir, shard, why + (f"; and {len(bad) - 1} more shard(s)" if len(bad) > 1 else ""))
        # The videos themselves need not be present any more: the cache holds them.
        pairs = load_pairs(data_cfg.train_data, weights=data_cfg.weights, alpha=data_cfg.alpha, check_files=False,
                           human_weight=getattr(data_cfg, "human_weight", 1.0))
        kept, dropped = [], []
        for pair in pairs:
            reasons = [f"{p}: {index['skipped'][video_id(p)]}" for p in (pair.winner, pair.loser) if video_id(p) in index["skipped"]]
            if reasons:
                dropped.append((pair, reasons))
                continue
            missing = [p for p in (pair.winner, pair.loser) if video_id(p) not in index["videos"]]
            if missing or pair.caption not in index["captions"]:
                raise UserError(f"latent cache {cache_dir} is incomplete: {pair.pair_id} needs "
                                f"{missing or [pair.caption]}; run `videotuna cache` again to finish it")
            kept.append(pair)
        if dropped:
            print(f"{len(dropped)} pair(s) left out: their videos could not be encoded "
                  f"(first: {dropped[0][0].pair_id}: {dropped[0][1][0]})", file=sys.stderr)
        if not kept:
            raise UserError(f"latent cache {cache_dir}: no pair has both videos encoded")
        return cls(cache_dir, index, kept)

    def check_model(self, model_cfg: Any) -> None:
        """Refuse a cache built by another backend or checkpoint than ``model_cfg``."""
        built = self.index["settings"]
        expected = {"backend": str(model_cfg.name), "pretrained": base_weights(model_cfg)}
        check_settings({"settings": built}, expected, self.cache_dir)

    def __len__(self) -> int:
        return len(self.pairs)

    def _tensor(self, entry: dict[str, str], suffix: str = "") -> torch.Tensor:
        shard = entry["shard"]
        try:  # shards were checked when the cache was opened; this catches one changed since
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(self.cache_dir / shard), framework="pt")
            return self._handles[shard].get_tensor(entry["key"] + suffix).float()
        except (SafetensorError, OSError) as exc:
            raise _shard_error(self.cache_dir, shard, first_line(exc)) from None

    def _sample(self, path: str, draws: torch.Generator) -> torch.Tensor:
        entry = self.index["videos"][video_id(path)]
        mean, std = self._tensor(entry, "/mean"), self._tensor(entry, "/std")
        return mean + std * torch.randn(mean.shape, generator=draws)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = item_key(key)
        pair = self.pairs[i]
        stored: dict[str, Any] = {}
        if self.draws is not None:  # the pair's stored draw of this epoch
            k = epoch % self.draws["seed"].shape[1]
            stored = {"pair_index": i, "draw_index": k, "draw_seed": self.draws["seed"][i, k]}
            if "ref_err" in self.draws:
                stored.update(draw_t=self.draws["t"][i, k], draw_drop=self.draws["drop"][i, k],
                              ref_err_w=self.draws["ref_err"][i, k, 0], ref_err_l=self.draws["ref_err"][i, k, 1])
            draws = generator("posterior-draw", int(stored["draw_seed"]))
        else:
            draws = generator("posterior", self.seed, epoch, i)  # a resumed run draws the same samples
        item = {
            "winner_latents": self._sample(pair.winner, draws),  # the backend's latent layout, e.g. [F', C', H', W']
            "loser_latents": self._sample(pair.loser, draws),
            "prompt_embeds": self._tensor(self.index["captions"][pair.caption]),  # [L, D]
            "caption": pair.caption,
            "weight": torch.tensor(pair.weight, dtype=torch.float32),
            "pair_id": pair.pair_id,
        }
        if NULL_CAPTION in self.index["captions"]:  # caches built before caption dropout lack it
            item["null_embeds"] = self._tensor(self.index["captions"][NULL_CAPTION])
        item.update(stored)
        return item

    def __getstate__(self) -> dict[str, Any]:  # safetensors handles do not cross worker processes
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
