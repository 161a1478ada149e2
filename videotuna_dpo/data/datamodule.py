"""PreferenceDataModule: (winner video, loser video, caption, weight) batches for DPO."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from videotuna_dpo.config import AT_LEAST_ONE, check_values, validate
from videotuna_dpo.data.frames import fit_stride, frame_indices, frame_span, resize_center_crop, to_model_range
from videotuna_dpo.data.latent_cache import CachedPreferenceDataset
from videotuna_dpo.data.order import EpochOrder, generator, item_key
from videotuna_dpo.data.preference import DataError, PairRecord, load_pairs
from videotuna_dpo.data.video_io import VideoReadError, count_frames, read_video
from videotuna_dpo.errors import UserError


@dataclass
class PreferenceDataSchema:
    name: str = "preference"
    train_data: str = "???"  # train_data.yaml of the official VideoDPO layout
    video_length: int = 16
    frame_stride: int = 1
    resolution: list[int] = field(default_factory=lambda: [320, 512])  # [H, W]
    frame_start: str = "auto"  # random (same start for winner and loser) | first | auto: random, first from a cache
    weights: str = "auto"  # auto | none | manifest | pair_score
    alpha: float = 1.0  # exponent of the official pair_score weights
    human_weight: float = 1.0  # multiplies the weight of pairs a person confirmed or flipped (pairs --labels)
    normalize_weights: bool = True  # rescale pair weights to mean 1: alpha shifts emphasis, not the step size
    batch_size: int = 1
    num_workers: int = 0
    shuffle: bool = True
    cache: Optional[str] = None  # latent cache dir (videotuna cache); training then skips VAE/T5


def normalize_weights(pairs: list[PairRecord]) -> list[PairRecord]:
    """Pairs with weights divided by their mean (mean 1), so re-weighting never rescales the learning rate."""
    mean = sum(p.weight for p in pairs) / len(pairs)
    if mean <= 0:
        raise UserError("every pair weight is 0: nothing would train")
    return [dataclasses.replace(p, weight=p.weight / mean) for p in pairs]


def plan_strides(pairs: list[PairRecord], video_length: int, frame_stride: int) -> list[int]:
    """Per pair, the largest stride <= ``frame_stride`` at which both videos hold ``video_length`` frames.

    Every video's frame count is read before training; videos shorter than ``video_length`` (or
    unreadable) are reported together, with their pair rows.
    """
    counts: dict[str, int] = {}
    problems: list[str] = []
    strides = []
    for pair in pairs:
        try:
            for path in (pair.winner, pair.loser):
                if path not in counts:
                    counts[path] = count_frames(path)
            n = min(counts[pair.winner], counts[pair.loser])
            strides.append(fit_stride(n, video_length, frame_stride, pair.winner if counts[pair.winner] == n else pair.loser))
        except (VideoReadError, UserError) as exc:
            problems.append(f"{pair.meta_dir}/pair.json row {pair.row}: {exc}")
            strides.append(0)
    if problems:
        raise DataError(problems)
    return strides


def stride_report(strides: list[int], video_length: int, frame_stride: int) -> str | None:
    """``'N pairs trained at stride s instead of S'`` lines, or None when every pair fits at ``frame_stride``."""
    fallback = Counter(s for s in strides if s != frame_stride)
    if not fallback:
        return None
    parts = [f"{n} of {len(strides)} pairs trained at stride {s} instead of {frame_stride}"
             for s, n in sorted(fallback.items(), reverse=True)]
    return (f"{'; '.join(parts)}: their videos are shorter than the {frame_span(video_length, frame_stride)} frames "
            f"that data.video_length={video_length} at data.frame_stride={frame_stride} needs (the largest stride "
            f"that fits is used, as the official loader falls back to stride 1)")


class PreferenceVideoDataset(Dataset):
    """Decodes both videos of a pair at the same frame positions -> ``[C, F, H, W]`` in [-1, 1].

    ``strides[i]`` is pair i's frame stride (``plan_strides``: the configured one, or the largest that fits).
    A random clip start is drawn from a generator seeded by (``seed``, epoch, index): see ``data.order``.
    """

    def __init__(self, pairs: list[PairRecord], video_length: int, frame_stride: int,
                 resolution: tuple[int, int], frame_start: str = "random", strides: list[int] | None = None):
        if frame_start not in ("random", "first"):
            raise UserError(f"data.frame_start must be 'random' or 'first', got {frame_start!r}")
        self.pairs = pairs
        self.video_length, self.frame_stride = video_length, frame_stride
        self.height, self.width = resolution
        self.frame_start = frame_start
        self.strides = strides if strides is not None else plan_strides(pairs, video_length, frame_stride)
        self.seed = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, path: str, pair: PairRecord) -> torch.Tensor:
        try:
            return read_video(path)
        except VideoReadError as exc:
            # Never substitute another video: the pair names exactly these two.
            raise UserError(f"{pair.meta_dir}/pair.json row {pair.row}: {exc}") from exc

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = item_key(key)
        pair = self.pairs[index]
        winner, loser = self._read(pair.winner, pair), self._read(pair.loser, pair)
        frames = min(winner.shape[0], loser.shape[0])
        try:  # the decoded count decides when a file's header claimed more frames than it holds
            stride = fit_stride(frames, self.video_length, self.strides[index], pair.winner)
        except UserError as exc:
            raise UserError(f"{pair.meta_dir}/pair.json row {pair.row}: {exc}") from exc
        latest = frames - frame_span(self.video_length, stride)
        start = 0
        if self.frame_start == "random":
            start = int(torch.randint(0, latest + 1, (1,), generator=generator("clip", self.seed, epoch, index)))
        idx = frame_indices(self.video_length, stride, start)
        out = {}
        for key, clip in (("winner", winner), ("loser", loser)):
            x = resize_center_crop(clip[idx], self.height, self.width)  # [F, C, H, W] on 0..255
            out[key] = to_model_range(x).permute(1, 0, 2, 3).contiguous()  # [C, F, H, W]
        out.update(caption=pair.caption, weight=torch.tensor(pair.weight, dtype=torch.float32),
                   pair_id=pair.pair_id, frame_start=start, frame_stride=stride)
        return out


class PreferenceDataModule(L.LightningDataModule):
    """Owns the preference dataset and its loader; validation runs in ``setup`` before training."""

    def __init__(self, cfg: PreferenceDataSchema | Any):
        super().__init__()
        self.cfg = cfg
        self.pairs: list[PairRecord] | None = None
        self.dataset: Dataset | None = None
        self.seed: int | None = None  # the run's seed (default: torch.initial_seed(), set by seed_everything)

    @classmethod
    def from_config(cls, data_cfg: Any, source: str = "<config>") -> "PreferenceDataModule":
        cfg = validate(data_cfg, PreferenceDataSchema, "data", source)
        if len(cfg.resolution) != 2:
            raise UserError(f"{source}: data.resolution must be [height, width], got {list(cfg.resolution)}")
        check_values(cfg, "data", {key: AT_LEAST_ONE for key in ("video_length", "frame_stride", "batch_size")}, source)
        check_values(cfg, "data", {"human_weight": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")}, source)
        if cfg.frame_start not in ("auto", "random", "first"):
            raise UserError(f"{source}: data.frame_start must be auto, random or first, got {cfg.frame_start!r}")
        if cfg.cache and cfg.frame_start == "random":
            raise UserError(f"{source}: data.cache holds each video's first clip only, but data.frame_start="
                            f"{cfg.frame_start!r}; set data.frame_start=first to train on the cache (or drop "
                            f"data.cache to draw a random clip start per step from the videos)")
        return cls(cfg)

    @property
    def holds_latents(self) -> bool:
        """Batches carry latents from ``data.cache`` (the strategy then builds the backend without VAE/text)."""
        return bool(self.cfg.cache)

    def check_model(self, model_cfg: Any) -> None:
        """Refuse a latent cache built by another backend or checkpoint than ``model_cfg``."""
        self.setup("fit")
        self.dataset.check_model(model_cfg)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        cfg = self.cfg
        if cfg.cache:
            self.dataset = CachedPreferenceDataset.open(cfg)
        else:
            pairs = load_pairs(cfg.train_data, weights=cfg.weights, alpha=cfg.alpha, human_weight=cfg.human_weight)
            start = "random" if cfg.frame_start == "auto" else cfg.frame_start
            self.dataset = PreferenceVideoDataset(pairs, cfg.video_length, cfg.frame_stride, tuple(cfg.resolution), start)
            report = stride_report(self.dataset.strides, cfg.video_length, cfg.frame_stride)
            if report:
                print(report, file=sys.stderr)
        if cfg.normalize_weights:
            self.dataset.pairs = normalize_weights(self.dataset.pairs)
        self.pairs = self.dataset.pairs

    def train_dataloader(self) -> DataLoader:
        """Pairs in an order seeded by (seed, epoch), this rank's share, continuing mid-epoch after a resume.

        The sampler shards by ``trainer.global_rank`` itself and is a ``DistributedSampler``, which Lightning keeps
        (whatever the Trainer's ``use_distributed_sampler``).
        """
        self.setup("fit")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = self.seed if self.seed is not None else torch.initial_seed()
        if world > 1:  # the ranks shard one order: rank 0's seed (a process seeded otherwise would overlap shares)
            seed = int(trainer.strategy.broadcast(seed))
        self.dataset.seed = seed
        order = EpochOrder(len(self.dataset), seed, self.cfg.shuffle, rank, world)
        order.skip = self._batches_done(-(-len(order) // self.cfg.batch_size)) * self.cfg.batch_size
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=order,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            drop_last=False,
        )

    def _batches_done(self, batches_per_epoch: int) -> int:
        """Batches of the current epoch a restored run already trained on (0 when not resuming mid-epoch)."""
        if self.trainer is None:
            return 0
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return done if 0 < done < batches_per_epoch else 0
