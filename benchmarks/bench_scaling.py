"""Steps/second of 1 vs 2 DDP processes (Lightning, gloo on the CPU) on the same global batch, as a ratio.

Each run is a Lightning ``Trainer`` (accelerator cpu; devices 1, or devices 2 with strategy ddp) training the
``DPOModule`` on ``bench_dpo_overhead``'s 8-layer CogVideoX (LoRA, latent-cache batches). The global batch is
the same in both (``--global-batch`` pairs; each of 2 processes takes half) and every process runs
``--threads`` threads (default 1): 1 process x 1 thread against 2 processes x 1 thread, as a data-parallel
run adds devices. Ideal is 2.0 when the machine has a free core per process; what falls short of it is DDP's
cost (the gradient all-reduce, the split batch) plus any other load on the cores. So the load cannot hide in
the figure, a callback on rank 0 also records its process's CPU seconds per step (which other jobs hardly
change): with 2 processes on free cores each spends about half the CPU time per step of the 1 process.

(An earlier version compared 1 process x 2 threads with 2 x 1 on 2 cores; a 2-thread process stalls whenever
one of its threads is descheduled, so that ratio measured the other jobs on the machine: 5-11x.)

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_scaling.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train(args: argparse.Namespace) -> None:
    """One Trainer run (both ranks execute this: Lightning starts rank 1 by running this script again)."""
    import time

    import lightning as L
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Dataset

    from bench_dpo_overhead import latent_batch, model_config
    from videotuna_dpo.models.cogvideox import CogVideoXBackend
    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    torch.set_num_threads(args.threads_per_process)

    class Pairs(Dataset):
        def __init__(self, n: int):
            self.items = [{k: v[0] for k, v in latent_batch(1, args.latent_side, seed=i).items()}
                          for i in range(n)]

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int) -> dict:
            return self.items[i]

    class StepTimer(L.Callback):
        def __init__(self):
            self.start = self.cpu_start = None

        def on_train_batch_end(self, trainer, pl_module, *rest) -> None:
            if trainer.global_step == args.warmup:
                self.start, self.cpu_start = time.perf_counter(), time.process_time()
            elif trainer.global_step == args.warmup + args.steps and trainer.is_global_zero:
                seconds, cpu = time.perf_counter() - self.start, time.process_time() - self.cpu_start
                Path(args.out).write_text(json.dumps({
                    "steps_per_s": round(args.steps / seconds, 4), "measured_steps": args.steps,
                    "cpu_s_per_step_rank0": round(cpu / args.steps, 4),
                    "processes": trainer.world_size, "threads_per_process": torch.get_num_threads(),
                    "pairs_per_process": args.global_batch // trainer.world_size,
                    "strategy": type(trainer.strategy).__name__,
                    "process_group_backend": getattr(trainer.strategy, "process_group_backend", None)}))

    backend = CogVideoXBackend.from_config(OmegaConf.create(model_config(args.model, "lora")))
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=5000.0)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    loader = DataLoader(Pairs(args.global_batch * (args.warmup + args.steps)), batch_size=args.global_batch // args.devices)
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer()])
    trainer.fit(module, train_dataloaders=loader)


def run(devices: int, threads: int, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """One Trainer run of ``devices`` processes in a new process group (killed whole if it outlives the timeout)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--train", "--devices", str(devices),
           "--threads-per-process", str(threads), "--model", str(model), "--out", str(out),
           "--latent-side", str(args.latent_side), "--global-batch", str(args.global_batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    from videotuna_dpo.jobs import free_port_below_ephemeral

    port = free_port_below_ephemeral(salt=4)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        raise RuntimeError(f"{devices}-process run still going after {args.timeout} s, killed:\n{stderr[-3000:]}")
    finally:
        try:  # a rank left behind by a rank 0 that exited
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{devices}-process run failed ({proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="measured steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4, help="pairs per step, over all processes")
    parser.add_argument("--latent-side", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="threads per process, in both runs")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--train", action="store_true", help="(internal) one Trainer run")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.train:
        train(args)
        return
    if args.global_batch % 2:
        parser.error("--global-batch must be even (2 processes split it)")
    from bench_dpo_overhead import HEAD_DIM, HEADS, LAYERS, build_model

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(tmp / "model", args.latent_side)
        one = run(1, args.threads, model, tmp / "one.json", args)
        two = run(2, args.threads, model, tmp / "two.json", args)
    print(json.dumps({
        "benchmark": "scaling",
        "model": f"CogVideoX transformer, {LAYERS} layers x {HEADS} heads x {HEAD_DIM}, LoRA rank 32, random weights",
        "latents": [args.global_batch, 3, 4, args.latent_side, args.latent_side], "global_batch_pairs": args.global_batch,
        "cpus": os.cpu_count(), "threads_per_process": args.threads, "load_average_1_5_15_min": {
            "before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "one_process": one, "two_processes": two,
        "ratio_two_over_one": round(two["steps_per_s"] / one["steps_per_s"], 3),
        "cpu_per_step_ratio_rank0_two_over_one": round(two["cpu_s_per_step_rank0"] / one["cpu_s_per_step_rank0"], 3),
        "note": f"{args.threads} thread(s) per process in both runs, on {os.cpu_count()} CPUs: 2.0 is ideal when "
                f"each process has a free core; the CPU ratio (ideal 0.5) shows the per-process work whatever the load",
    }, indent=2))


if __name__ == "__main__":
    main()
