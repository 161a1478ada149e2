"""``videotuna generate``: N samples per prompt through a backend, as mp4 + a JSON record each.

A video counts as done when both ``<id>_s<k>.mp4`` and its record ``<id>_s<k>.json`` exist; both
are written atomically, the record last, so a rerun keeps every complete video and redoes the rest.
On several processes (``launch``) each runs its share of the batches (see :mod:`videotuna_dpo.jobs`);
every file is one video's, so the directory is the same bytes for any number of processes.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from videotuna_dpo.config import check_values, validate
from videotuna_dpo.data.video_io import write_video
from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import check_writable_dir, remove_stale_temporaries, write_json_atomic
from videotuna_dpo.jobs import Launch, Progress, chunked, is_main_process, local_device, rank_share, run_job
from videotuna_dpo.pipeline.prompts import load_prompt_file
from videotuna_dpo.registry import call_with_optional
from videotuna_dpo.sampling import GENERATE_RULES, GenerateSchema, sampler_kwargs
from videotuna_dpo.user_files import read_json


@dataclass(frozen=True)
class Job:
    prompt_id: str
    prompt: str
    sample: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.prompt_id}_s{self.sample}"


def plan_jobs(prompts: list[tuple[str, str]], num_samples: int, seed: int) -> list[Job]:
    """Every (prompt, sample) with its own seed: ``seed + prompt_index * num_samples + sample``."""
    return [Job(pid, text, k, seed + i * num_samples + k) for i, (pid, text) in enumerate(prompts) for k in range(num_samples)]


def is_done(out: Path, job: Job) -> bool:
    return (out / f"{job.name}.mp4").is_file() and (out / f"{job.name}.json").is_file()


def load_backend(cfg: Any, registry: Any, weights: str | None = None, source: str = "<config>"):
    """The config's ``model:`` backend, with tuned weights when given, on this process's GPU when there is one."""
    model_cfg = cfg.model
    if weights:
        model_cfg = OmegaConf.merge(model_cfg, {"trainable_weights": str(weights)})
    backend = call_with_optional(registry.get("model", model_cfg.name).from_config, model_cfg, source=source)
    if torch.cuda.is_available():
        backend.to(local_device())
    return backend.eval()


def _as_is(chunk: list[Job]) -> list[Job]:
    return chunk


def generate_videos(
    cfg: Any,
    registry: Any,
    prompts_file: str | Path,
    out: str | Path,
    num_samples: int = 4,
    seed: int = 0,
    weights: str | None = None,
    backend: Any = None,
    source: str = "<config>",
    launch: Launch | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Generate what is missing under ``out``; returns counts of generated and kept videos (of the whole job)."""
    settings = validate(cfg.get("generate"), GenerateSchema, "generate", source)
    check_values(settings, "generate", GENERATE_RULES, source)
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    launch = launch or Launch()
    launch.resolved()  # a bad --devices is said before the model loads
    out = check_writable_dir(out, f"--out {out}")  # before the model loads
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(load_prompt_file(prompts_file), num_samples, seed)
    remove_stale_temporaries(out)  # of a killed run; a finished video is never one, whatever its prompt id
    todo = [j for j in jobs if not is_done(out, j)]
    if todo and backend is None:
        backend = load_backend(cfg, registry, weights, source)
    sampler = {k: settings[k] for k in ("num_frames", "steps", "guidance", "height", "width", "fps", "negative_prompt", "lossless")}
    if settings.guidance_2 is not None:
        sampler["guidance_2"] = settings.guidance_2
    model = {"name": cfg.model.name, "pretrained": str(cfg.model.get("pretrained", "")), "weights": weights}

    missing = set(todo)

    def write(batch: list[Job], videos: torch.Tensor) -> None:
        for job, video in zip(batch, videos):
            if job not in missing:  # the rest of a batch a killed run wrote part of
                continue
            write_video(out / f"{job.name}.mp4", video, fps=settings.fps, lossless=settings.lossless)
            record = {"prompt": job.prompt, "prompt_id": job.prompt_id, "sample": job.sample, "seed": job.seed,
                      "sampler": sampler, "model": model, "video": f"{job.name}.mp4"}
            write_json_atomic(out / f"{job.name}.json", record)

    # The device samples the next batch while a thread encodes the last one's mp4s (PyAV leaves the GIL to x264).
    writes: list[Future] = []

    def step(batch: list[Job]) -> None:
        videos = backend.generate([j.prompt for j in batch], seed=[j.seed for j in batch],
                                  **sampler_kwargs(settings))  # [B, F, C, H, W] in [0, 1]
        while writes and (writes[0].done() or len(writes) > 1):
            writes.pop(0).result()  # a failed write stops the job here
        writes.append(writer.submit(write, batch, videos.detach().cpu()))

    names = {f"{j.name}.json" for j in todo}
    # The batches of an uninterrupted one-process run, whole: a batch a killed run wrote part of is sampled again
    # whole (its written videos kept), since a video's bytes may depend on the batch it was sampled in.
    chunks = [c for c in chunked(jobs, settings.batch_size) if missing.intersection(c)]

    def loader(rank: int, world: int) -> DataLoader:
        return DataLoader(rank_share(chunks, rank, world), batch_size=None, collate_fn=_as_is)

    if todo:
        bar = Progress(len(jobs), len(jobs) - len(todo), lambda: len(names.intersection(os.listdir(out))),
                       desc="generate", unit="video", enabled=progress)
        def finish() -> None:
            while writes:
                writes.pop(0).result()

        with ThreadPoolExecutor(max_workers=1) as writer:
            run_job(launch, step, loader, bar, finish)
    if is_main_process():
        listing = {f"{j.name}.mp4": j.prompt for j in jobs}
        if not (out / "prompts.json").is_file() or read_json(out / "prompts.json") != listing:  # a rerun with nothing
            write_json_atomic(out / "prompts.json", listing)  # to do leaves every file of the directory as it was
    return {"generated": len(todo), "kept": len(jobs) - len(todo), "total": len(jobs)}
