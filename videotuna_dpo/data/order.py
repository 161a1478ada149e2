"""Training randomness that a resumed run reproduces: seeds derived from (run seed, epoch, position).

Nothing random in a training step depends on a generator's history: the pair order of an epoch, each
item's clip start and posterior sample, and each step's noise, timesteps and caption dropout are drawn
from seeds made of the run's seed and where the draw happens. A run resumed from a checkpoint (which
restores epoch and position) therefore draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils.data import DistributedSampler


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints and strings), stable across processes and Python versions."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded with ``derived_seed(*parts)``."""
    return torch.Generator().manual_seed(derived_seed(*parts))


@contextmanager
def seeded(*parts: Any) -> Iterator[None]:
    """Inside: the global torch generators (CPU and CUDA) seeded from ``parts``; outside: as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(*parts))
        yield


def item_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """A dataset key -> (index, epoch); a plain index (direct use, other samplers) is epoch 0."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


class EpochOrder(DistributedSampler):
    """Keys ``(index, epoch)`` of one epoch: a permutation seeded by (seed, epoch), or the dataset order.

    ``set_epoch`` (called by Lightning at each epoch start) picks the epoch; ``rank``/``world_size``
    take this process's share as DistributedSampler does (padded to equal shares); ``skip`` drops the
    first items of the next iteration, where a resumed run continues mid-epoch.
    A ``DistributedSampler`` so that Lightning keeps it: under a DDP strategy (VideoTuna's default, even on one
    device) it wraps any other sampler in its own, which shards the whole order again and cannot skip.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        # DistributedSampler holds seed, shuffle, rank, num_replicas (the world size) and epoch (0).
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.size = size
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch, in order."""
        order = (torch.randperm(self.size, generator=generator("order", self.seed, self.epoch)).tolist()
                 if self.shuffle else list(range(self.size)))
        order += order[: len(self) * self.num_replicas - self.size]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.skip = self.skip, 0
        for index in self.indices()[start:]:
            yield index, self.epoch

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)
