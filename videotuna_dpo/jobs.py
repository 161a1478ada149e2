"""One data job (generate, score, cache) on one process or many: Lightning's predict loop, under DDP for several.

The work is a list of items split into fixed chunks (the batches of a one-process run); chunk ``c`` goes to rank
``c mod world``. A chunk is what one process would have batched alone, so every rank count computes the same
batches, and each output file is one item's (or one chunk's) whatever rank wrote it: the result is the same bytes
for 1 or N processes. What is left to do is read from the files that exist before the job starts, so a job killed
on N processes resumes on M. Rank 0 shows the progress of the whole job from those files and merges at the end.

Processes: ``--devices N`` starts N-1 more processes of the same command (Lightning's launcher) on one machine;
under ``torchrun`` or SLURM's ``srun`` the launcher's processes are used (``--devices`` per node, ``--num-nodes``).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import lightning as L
import torch
from tqdm.auto import tqdm

from videotuna_dpo.errors import UserError

# The launch variables this process started with (read when jobs is first imported, before any Trainer runs
# here). Lightning writes LOCAL_RANK into the process that launches ranks; set after start, it is that process's own.
_STARTED_WITH = {name: os.environ.get(name) for name in ("LOCAL_RANK", "WORLD_SIZE")}

# Seconds a rank waits for the others (in joining the job and at its barriers) before it gives up with an error.
TIMEOUT_ENV = "VIDEOTUNA_DIST_TIMEOUT"


@dataclass(frozen=True)
class Launch:
    """Where a job runs: ``devices`` processes per node on ``num_nodes`` nodes, on ``accelerator``."""

    devices: int | None = None  # None: the launcher's processes per node (torchrun, srun), else 1
    num_nodes: int | None = None
    accelerator: str = "auto"
    num_workers: int = 2  # DataLoader worker processes that decode videos

    def resolved(self) -> tuple[int, int]:
        devices = self.devices if self.devices is not None else _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE") or 1
        world = _env_int("WORLD_SIZE", "SLURM_NTASKS")
        nodes = self.num_nodes if self.num_nodes is not None else (max(1, world // devices) if world else 1)
        if devices < 1 or nodes < 1:
            raise UserError(f"--devices and --num-nodes must be at least 1, got {devices} and {nodes}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be 0 or more, got {self.num_workers}")
        check_launch_environment(devices * nodes, f"--devices {devices} --num-nodes {nodes}")
        return devices, nodes


def check_launch_environment(processes: int, what: str) -> None:
    """A run of ``processes`` > 1 is refused where Lightning would take this process for one rank of a job that a
    launcher started, and wait for the other ranks, which nothing starts.

    Lightning takes ``LOCAL_RANK`` in the environment as the sign of an outside launcher. Every launcher (torchrun,
    Lightning's own for the processes it starts) sets ``WORLD_SIZE`` with it; after a DDP run Lightning removes
    ``WORLD_SIZE`` from its own process but leaves ``LOCAL_RANK``, so a script or notebook that trained under DDP
    (the VideoTuna host's default strategy, even on one device) hands ``LOCAL_RANK`` alone to the commands it starts.
    Under SLURM Lightning reads SLURM's variables instead. Only a process that *started* with ``LOCAL_RANK`` and
    no ``WORLD_SIZE`` is refused: in a script that trains twice on several processes, Lightning's processes run
    the whole script again and the second run finds the variables Lightning set in the first, which is its design.
    """
    inherited = _STARTED_WITH["LOCAL_RANK"] is not None and _STARTED_WITH["WORLD_SIZE"] is None
    if processes > 1 and inherited and "LOCAL_RANK" in os.environ and "WORLD_SIZE" not in os.environ \
            and "SLURM_NTASKS" not in os.environ:
        raise UserError(
            f"{what}: {processes} processes, but this process's environment has LOCAL_RANK={os.environ['LOCAL_RANK']} "
            f"without WORLD_SIZE: Lightning would take it for one rank of a job a launcher started and wait for the "
            f"other ranks, which nothing starts. torchrun and Lightning's own launcher set both; LOCAL_RANK alone is "
            f"left over, e.g. from a DDP run earlier in the Python process that started this one. Unset LOCAL_RANK "
            f"(and NODE_RANK, MASTER_PORT) for this command, or start it with torchrun")


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def free_port_below_ephemeral(salt: int = 0) -> int:
    """A free local TCP port below the ephemeral range, for ``MASTER_PORT`` of processes started on one machine.

    Lightning picks a free *ephemeral* port itself; under load a rank's connection attempts to it can be given
    that very port as their source (a TCP self-connect), and rank 0 then fails with EADDRINUSE. Ports below the
    range are never handed out as source ports; the pid (and ``salt``) spread concurrent callers apart.
    """
    import socket
    from pathlib import Path

    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.is_file() else 32768
    start = 20000 + (os.getpid() * 7 + salt) % max(1, low - 20000 - 1000)
    for port in range(start, start + 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}..{start + 999}")


def local_device() -> str:
    """This process's device before the job starts: ``cuda:<local rank>`` when there is a GPU, else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{_env_int('LOCAL_RANK', 'SLURM_LOCALID') or 0}"


def is_main_process() -> bool:
    """Rank 0 of the job (the only process when there is one): the one that merges, reports and prints."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return (_env_int("RANK", "SLURM_PROCID") or 0) == 0 and (_env_int("LOCAL_RANK") or 0) == 0


def chunked(items: Sequence[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive chunks of ``size`` (the last one shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), max(1, int(size)))]


def rank_share(chunks: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The chunks rank ``rank`` of ``world`` runs: every ``world``-th, from its own."""
    return list(chunks[rank::world])


class Progress:
    """A bar over the whole job on rank 0: ``count()`` (read from the files all ranks write) every half second."""

    def __init__(self, total: int, initial: int, count: Callable[[], int], desc: str, unit: str, enabled: bool = True):
        self.total, self.initial, self.count, self.desc, self.unit = total, initial, count, desc, unit
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def start(self) -> None:
        self._bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit=self.unit, disable=not self.enabled,
                         dynamic_ncols=True)
        self._thread = threading.Thread(target=self._poll, name=f"{self.desc}-progress", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        done = min(self.total, self.initial + self.count())
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._refresh()
            except OSError:  # a file renamed under the count; the next poll reads it
                pass

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._refresh()
        self._bar.close()
        self._thread = None


class _Step(L.LightningModule):
    """The job's step as a LightningModule; it owns no parameters (the backend or scorers stay where they were put)."""

    def __init__(self, step: Callable[[Any], Any]):
        super().__init__()
        self._run_step = step

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # the step puts what it needs where its model is

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        if batch is not _NOTHING:
            self._run_step(batch)


_NOTHING = ()  # the one batch of a rank with no chunk: Lightning refuses a loader of no batches on any rank


def _nothing(batch: Any) -> Any:
    return _NOTHING


class _Data(L.LightningDataModule):
    def __init__(self, loader: Callable[[int, int], Any]):
        super().__init__()
        self.loader = loader

    def predict_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        loader = self.loader(self.trainer.global_rank, self.trainer.world_size)
        return loader if len(loader) else DataLoader([0], batch_size=None, collate_fn=_nothing)


class _ShowProgress(L.Callback):
    def __init__(self, progress: Progress | None):
        self.progress = progress

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:  # every rank, even one with no chunk
        if self.progress is not None and trainer.is_global_zero:
            self.progress.start()


@dataclass
class Ranks:
    """Who this process is in the job that just ran, and the job's way to gather the ranks' summaries."""

    rank: int = 0
    world: int = 1

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, by rank (``[obj]`` alone)."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def run_job(launch: Launch, step: Callable[[Any], Any], loader: Callable[[int, int], Any],
            progress: Progress | None = None, finish: Callable[[], Any] | None = None) -> Ranks:
    """Run ``step`` on every batch of ``loader(rank, world)`` on each rank, then ``finish()`` (the rank's last
    writes); return once every rank has finished."""
    devices, nodes = launch.resolved()
    if devices * nodes == 1:  # no launcher, no process group: the loop itself (an interrupt stays an interrupt)
        if progress is not None:
            progress.start()
        try:
            for batch in loader(0, 1):
                step(batch)
            if finish is not None:
                finish()
        finally:
            if progress is not None:
                progress.close()
        return Ranks(0, 1)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available" banner before every job
    from lightning.pytorch.strategies import DDPStrategy

    for message in (".*predict returned None.*", ".*isinstance\\(treespec, LeafSpec\\).*",
                    ".*overridden `transfer_batch_to_device`.*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)  # the steps write files; Lightning's loader advice misfits

    strategy = DDPStrategy(timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 1800))))
    trainer = L.Trainer(accelerator=launch.accelerator, devices=devices, num_nodes=nodes, strategy=strategy,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, inference_mode=False, callbacks=[_ShowProgress(progress)])
    try:
        trainer.predict(_Step(step), datamodule=_Data(loader), return_predictions=False)
        ranks = Ranks(trainer.global_rank, trainer.world_size)
        if finish is not None:
            finish()
        ranks.barrier()  # every rank's files are written
    finally:
        if progress is not None:
            progress.close()
    return ranks

