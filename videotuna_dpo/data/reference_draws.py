"""Precomputed reference errors (``dpo.precompute_reference``): K stored draws per pair, next to the latent cache.

A no-grad pre-pass runs the reference model on K draws of every pair (a seed, the timesteps, the caption-dropout
decision) and stores the reference's errors on winner and loser; training then runs only the policy, each step
on the pair's next draw (epoch e uses draw e mod K): the posterior sample of both latents and the noise come from
the draw's seed, the timesteps and the dropout decision as stored, so the policy sees what the reference saw.

Layout of ``<cache>/reference/``: ``index.json`` (the settings the draws were computed at, written before any
shard; every pair's shard and row once the pass ends) and ``draws-r<rank>-<n>.safetensors``, one table of pairs
per shard: ``seed`` [P, K] int64, ``t`` [P, K, 2] (winner, loser), ``drop`` [P, K] bool, ``ref_err`` [P, K, 2]
float32, the pairs' keys and the settings' digest in its metadata. Each rank writes its own shards atomically, so
an interrupted pass resumes at the pairs no shard holds, on any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, DistributedSampler

from videotuna_dpo.data.latent_cache import video_id
from videotuna_dpo.data.order import derived_seed
from videotuna_dpo.data.preference import PairRecord
from videotuna_dpo.errors import UserError, first_line
from videotuna_dpo.fileio import atomic_file, write_json_atomic
from videotuna_dpo.user_files import read_json

REFERENCE_DIR = "reference"
INDEX = "index.json"
VERSION = 1
SHARD = re.compile(r"draws-r(\d+)-(\d+)\.safetensors")
# Model keys that leave the reference's prediction unchanged: what trains, how it is stored, how it samples.
NOT_REFERENCE_KEYS = ("trainable_weights", "lora", "gradient_checkpointing", "reference_on_cpu", "load_text_and_vae",
                      "vae_slicing", "vae_tiling", "vae_dtype", "trust_checkpoint", "fps", "ddim_eta", "sample_shift",
                      "sample_solver", "lcm_origin_steps", "activation_checkpointing", "grad_offload")
PATH_KEYS = ("pretrained", "ckpt", "denoiser_ckpt", "lora_ckpt", "init_weights", "host_config")
DPO_KEYS = ("share_noise", "uncond_prob", "timestep_sampling", "logit_mean", "logit_std", "mode_scale")


def reference_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / REFERENCE_DIR


def pair_key(pair: PairRecord) -> str:
    """A pair by content (both videos and the caption), so a rebuilt dataset never reuses another pair's draws."""
    text = json.dumps([video_id(pair.winner), video_id(pair.loser), pair.caption])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def draw_seed(seed: int, key: str, k: int) -> int:
    return derived_seed("reference-draw", int(seed), key, int(k))


def reference_settings(model_cfg: Any, dpo: Any, seed: int) -> dict[str, Any]:
    """What the stored draws depend on: the reference model, how draws are made, how many, from which seed."""
    model = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    model = {k: v for k, v in model.items() if k not in NOT_REFERENCE_KEYS}
    for key in PATH_KEYS:
        value = model.get(key)
        if value and Path(str(value)).exists():
            model[key] = str(Path(str(value)).resolve())
    settings = {f"model.{k}": v for k, v in sorted(model.items())}
    settings.update({f"dpo.{k}": getattr(dpo, k) for k in DPO_KEYS})
    settings.update({"dpo.reference_draws": int(dpo.reference_draws), "seed": int(seed)})
    return json.loads(json.dumps(settings))  # as the index stores them (lists, not tuples)


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class ReferenceDraws:
    """The stored draws of one latent cache at one set of settings: what is done, where, and the tables."""

    def __init__(self, directory: str | Path, settings: dict[str, Any]):
        self.directory = Path(directory)
        self.settings = settings
        self.draws = int(settings["dpo.reference_draws"])
        self.digest = _digest(settings)

    # -- the index ---------------------------------------------------------------------------------
    def read_index(self) -> dict[str, Any] | None:
        path = self.directory / INDEX
        if not path.is_file():
            return None
        index = read_json(path)
        if not isinstance(index, dict) or not isinstance(index.get("settings"), dict) or index.get("version") != VERSION:
            raise UserError(f"{path}: not an index of stored reference draws (version {VERSION}); delete "
                            f"{self.directory} to compute them again")
        return index

    def check_settings(self) -> dict[str, Any] | None:
        """The index, refused by name when it was computed at other settings; None when there is none yet."""
        index = self.read_index()
        if index is None:
            return None
        built = index["settings"]
        diffs = [f"{k}: draws have {built.get(k)!r}, config has {v!r}"
                 for k, v in self.settings.items() if built.get(k) != v]
        diffs += [f"{k}: draws have {v!r}, config has none" for k, v in built.items() if k not in self.settings]
        if diffs:
            raise UserError(f"reference draws {self.directory} were computed with other settings ({'; '.join(diffs)}); "
                            f"train with the matching config, or delete {self.directory} to compute them again")
        return index

    # -- shards ------------------------------------------------------------------------------------
    def shard_files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if SHARD.fullmatch(p.name))

    def scan(self) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
        """Every stored pair -> (shard, row), the first shard holding it; and the unreadable shards -> why."""
        done: dict[str, tuple[str, int]] = {}
        bad: dict[str, str] = {}
        for path in self.shard_files():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    meta = handle.metadata() or {}
                keys = json.loads(meta["pairs"])
            except (SafetensorError, OSError, KeyError, ValueError) as exc:
                bad[path.name] = first_line(exc)
                continue
            if meta.get("settings") != self.digest:
                raise UserError(f"{path}: holds reference draws computed at other settings than its index "
                                f"{self.directory / INDEX} records; delete {self.directory} to compute them again")
            for row, key in enumerate(keys):
                done.setdefault(key, (path.name, row))
        return done, bad

    def prepare(self, keys: list[str]) -> list[int]:
        """Check or write the index's settings; the indices of ``keys`` no shard holds yet (the pass's work).

        Safe to run in every process of a run at once: before the pass starts nobody writes a shard, and each
        writes the same index.
        """
        index = self.check_settings()
        done, bad = self.scan()
        for name, why in bad.items():
            print(f"{self.directory / name}: unreadable ({why}); computing the draws it held again", file=sys.stderr)
        if index is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.directory / INDEX, {"version": VERSION, "settings": self.settings,
                                                       "draws": self.draws, "pairs": {}, "shards": []})
        return [i for i, key in enumerate(keys) if key not in done]

    def merge(self) -> dict[str, Any]:
        """Index every stored pair (one process, after every rank's pass); unreadable shards are removed."""
        done, bad = self.scan()
        for name in bad:
            (self.directory / name).unlink(missing_ok=True)
        index = {"version": VERSION, "settings": self.settings, "draws": self.draws,
                 "pairs": {k: {"shard": s, "row": r} for k, (s, r) in sorted(done.items())},
                 "shards": sorted({s for s, _ in done.values()})}
        write_json_atomic(self.directory / INDEX, index)
        return index

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tables of ``keys``, row i for key i: ``seed`` [N, K], ``t`` [N, K, 2], ``drop`` [N, K], ``ref_err`` [N, K, 2]."""
        index = self.check_settings()
        if index is None:
            raise UserError(f"no reference draws in {self.directory}: train with dpo.precompute_reference=true "
                            f"(its pre-pass computes them)")
        missing = [k for k in keys if k not in index["pairs"]]
        if missing:
            raise UserError(f"reference draws {self.directory} lack {len(missing)} of {len(keys)} pairs; train again "
                            f"with dpo.precompute_reference=true: the pre-pass resumes and computes them")
        tables: dict[str, dict[str, torch.Tensor]] = {}
        for name in index["shards"]:
            if not SHARD.fullmatch(str(name)):
                raise UserError(f"{self.directory / INDEX}: shard name {name!r} is not a draws shard of this directory")
            try:
                tables[name] = load_file(str(self.directory / name))
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{self.directory / name}: unreadable ({first_line(exc)}); train again with "
                                f"dpo.precompute_reference=true to compute its draws again") from None
        rows = [index["pairs"][k] for k in keys]
        return {field: torch.stack([tables[r["shard"]][field][r["row"]] for r in rows])
                for field in ("seed", "t", "drop", "ref_err")}

    def writer(self, rank: int, pairs_per_shard: int = 64) -> "DrawWriter":
        return DrawWriter(self, rank, pairs_per_shard)


class DrawWriter:
    """One rank's shards: a pair is written once all its K draws are in, ``pairs_per_shard`` pairs a shard."""

    def __init__(self, store: ReferenceDraws, rank: int, pairs_per_shard: int = 64):
        self.store, self.rank, self.pairs_per_shard = store, int(rank), max(1, int(pairs_per_shard))
        taken = [int(m.group(2)) for p in store.shard_files() if (m := SHARD.fullmatch(p.name)) and int(m.group(1)) == rank]
        self.next_shard = max(taken, default=-1) + 1
        self.partial: dict[str, dict[str, Any]] = {}
        self.ready: list[tuple[str, dict[str, Any]]] = []
        self.written = 0

    def add(self, key: str, k: int, seed: int, t: torch.Tensor, drop: bool, ref_err: torch.Tensor) -> None:
        """Draw ``k`` of pair ``key``: its seed, timesteps ``[2]``, dropout decision and reference errors ``[2]``."""
        draws = self.store.draws
        entry = self.partial.setdefault(key, {"seed": [None] * draws, "t": [None] * draws, "drop": [None] * draws,
                                              "ref_err": [None] * draws})
        entry["seed"][k], entry["t"][k], entry["drop"][k] = int(seed), t.detach().cpu(), bool(drop)
        entry["ref_err"][k] = ref_err.detach().float().cpu()
        if all(s is not None for s in entry["seed"]):
            self.ready.append((key, self.partial.pop(key)))
            if len(self.ready) >= self.pairs_per_shard:
                self.flush()

    def flush(self) -> None:
        """Write the complete pairs held so far as one shard (the shard appears whole or not at all)."""
        if not self.ready:
            return
        keys = [key for key, _ in self.ready]
        tensors = {"seed": torch.tensor([e["seed"] for _, e in self.ready], dtype=torch.int64),
                   "t": torch.stack([torch.stack(e["t"]) for _, e in self.ready]),
                   "drop": torch.tensor([e["drop"] for _, e in self.ready], dtype=torch.bool),
                   "ref_err": torch.stack([torch.stack(e["ref_err"]) for _, e in self.ready])}
        path = self.store.directory / f"draws-r{self.rank}-{self.next_shard:05d}.safetensors"
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"pairs": json.dumps(keys), "settings": self.store.digest})
        self.next_shard += 1
        self.written += len(keys)
        self.ready.clear()


class RankShare(DistributedSampler):
    """Keys already sharded for this rank, in order. A ``DistributedSampler`` so that Lightning, under a DDP
    strategy with ``use_distributed_sampler`` on, keeps it instead of sharding the share again."""

    def __init__(self, keys: list[Any]):
        super().__init__(range(max(1, len(keys))), num_replicas=1, rank=0, shuffle=False)
        self.keys = list(keys)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class ReferencePassData(L.LightningDataModule):
    """The pre-pass's items: every draw of this rank's share of the pending pairs (equal shares on every rank)."""

    def __init__(self, dataset: Any, pending: list[int], draws: int, batch_size: int):
        super().__init__()
        self.dataset, self.pending, self.draws, self.batch_size = dataset, list(pending), int(draws), int(batch_size)

    def share(self, rank: int, world: int) -> list[int]:
        """Pending pairs of ``rank``, padded as DistributedSampler pads, so every rank runs as many batches."""
        n = len(self.pending)
        size = -(-n // world) * world
        return [self.pending[j % n] for j in range(size)][rank::world]

    def predict_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        keys = [(i, k) for i in self.share(rank, world) for k in range(self.draws)]
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=RankShare(keys), num_workers=0,
                          shuffle=False)


class ReferencePass(L.Callback):
    """Writes what ``DPOModule.predict_step`` returns into this rank's shards; rank 0 indexes them at the end."""

    def __init__(self, store: ReferenceDraws, keys: list[str], pairs_per_shard: int = 64):
        self.store, self.keys, self.pairs_per_shard = store, keys, pairs_per_shard
        self.writer: DrawWriter | None = None

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.writer = self.store.writer(trainer.global_rank, self.pairs_per_shard)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        for j, i in enumerate(outputs["pair_index"].tolist()):
            self.writer.add(self.keys[i], int(outputs["draw_index"][j]), int(outputs["seed"][j]), outputs["t"][j],
                            bool(outputs["drop"][j]), outputs["ref_err"][j])

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self.writer.flush()
        trainer.strategy.barrier("reference_pass_written")
        if trainer.is_global_zero:
            self.store.merge()
        trainer.strategy.barrier("reference_pass_indexed")
