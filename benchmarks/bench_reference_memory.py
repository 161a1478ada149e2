"""Peak memory of DPO against SFT, by where the reference lives: LoRA (adapters off, no copy) and a full fine-tune
with its frozen copy on the device, on the CPU (``model.reference_on_cpu``) or not built at all
(``dpo.precompute_reference``: the reference's errors come stored in the batch as ``ref_err_w``/``ref_err_l``).

The model is ``bench_dpo_overhead``'s 8-layer CogVideoX, trained from latent-cache batches (no VAE, no T5).
On a CPU torch keeps no allocator statistics, so each configuration runs in its own process and its figure is
the process's resident memory: the peak (``VmHWM``) over the steps minus the resident memory after the imports,
before the model loads. The peak is reset (``/proc/self/clear_refs``) after the model and batch are built and
one warm-up step has run, so neither a transient of loading nor the first paging-in of torch's kernels counts;
what stays resident (weights, the reference copy, gradients, AdamW's state) does, as the floor of the peak. On a CPU "reference on the device" and "reference
on the CPU" are the same RAM: they differ on a GPU, where the second keeps the copy off the GPU.

Targets: LoRA-DPO <= 1.1x LoRA-SFT; full fine-tune with precomputed reference <= 1.1x full SFT.
Prints one JSON object. Run: .venv/bin/python benchmarks/bench_reference_memory.py [--steps 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (finetune, objective, model keys, dpo keys)
    "lora_sft": ("lora", "sft", {}, {}),
    "lora_dpo": ("lora", "dpo", {}, {}),
    "full_sft": ("full", "sft", {}, {}),
    "full_dpo_reference_on_device": ("full", "dpo", {}, {}),
    "full_dpo_reference_on_cpu": ("full", "dpo", {"reference_on_cpu": True}, {}),
    "full_dpo_precomputed_reference": ("full", "dpo", {}, {"precompute_reference": True}),
}
MEASURE = ("peak resident memory of the process (Linux VmHWM, reset by /proc/self/clear_refs after the model is "
           "built and one warm-up step) minus its resident memory after the imports (those of the code that builds "
           "the model included); one process per configuration")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Return freed heap to the system and start a new peak at the present resident size; False if Linux refuses."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """Peak resident memory since the last :func:`reset_peak` (or since the start, if it could not reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def import_model_code() -> None:
    """Import what building the backend imports (diffusers' and transformers' classes load lazily), so that a
    baseline taken after this call leaves the code out of the figure."""
    import diffusers
    import transformers

    for name in ("AutoencoderKLCogVideoX", "CogVideoXDDIMScheduler", "CogVideoXTransformer3DModel"):
        getattr(diffusers, name)
    for name in ("AutoTokenizer", "T5EncoderModel"):
        getattr(transformers, name)
    import bench_dpo_overhead  # noqa: F401
    import videotuna_dpo.strategy  # noqa: F401


def run_child(args: list[str]) -> dict:
    """Run this directory's ``args[0]`` in a new Python process; its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                                                          os.environ.get("PYTHONPATH")]))})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(config: str, root: Path, latent_side: int, steps: int, threads: int) -> dict:
    """Build one configuration, reset the peak, run ``steps`` steps; the peak over the post-import baseline."""
    import torch

    torch.set_num_threads(threads)
    from contextlib import nullcontext

    from omegaconf import OmegaConf

    from bench_dpo_overhead import latent_batch, model_config, store_reference_errors
    from videotuna_dpo.losses import per_sample_mse
    from videotuna_dpo.models.cogvideox import CogVideoXBackend
    from videotuna_dpo.models.finetune import without_reference_copy
    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    import_model_code()
    baseline = rss_bytes()
    finetune, objective, model_keys, dpo_keys = CONFIGS[config]
    precompute = dpo_keys.get("precompute_reference", False)
    # SFT has no reference: a full fine-tune's SFT builds no frozen copy either.
    with without_reference_copy() if precompute or objective == "sft" else nullcontext():
        backend = CogVideoXBackend.from_config(OmegaConf.create(model_config(root, finetune, **model_keys)))
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=5000.0, **dpo_keys)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = latent_batch(1, latent_side)
    if precompute:  # what the pre-pass stores, in the batch
        store_reference_errors(module, backend, batch)

    def loss() -> torch.Tensor:
        if objective == "dpo":
            return module.dpo_step(batch)[0].loss
        x0, noise, t, cond2 = module.step_inputs(batch)
        return per_sample_mse(backend.predict(backend.add_noise(x0, noise, t), t, cond2), backend.target(x0, noise, t)).mean()

    def step() -> None:
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    built = rss_bytes() - baseline
    step()  # warm-up: torch's kernels paged in, lazily read weights resident; AdamW's state is allocated and stays
    reset = reset_peak()
    for _ in range(steps):
        step()
    return {"peak_mb": round((peak_bytes() - baseline) / 2**20, 1), "after_build_mb": round(built / 2**20, 1),
            "peak_reset_after_build": reset,
            "parameters_in_process": sum(p.numel() for p in backend.parameters())
            + sum(p.numel() for r in backend._ref_cpu.values() for p in r.parameters()),
            "trainable_parameters": sum(p.numel() for p in backend.trainable_parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2, help="measured steps, after one warm-up step")
    parser.add_argument("--latent-side", type=int, default=16, help="latent height = width (pixels / 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure", choices=sorted(CONFIGS), help="(internal) measure one configuration, in this process")
    parser.add_argument("--model", type=Path, help="(internal) the model directory")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.model, args.latent_side, args.steps, args.threads)))
        return
    import torch

    from bench_dpo_overhead import HEAD_DIM, HEADS, LAYERS, build_model

    with tempfile.TemporaryDirectory() as tmp:
        root = build_model(Path(tmp) / "model", args.latent_side)
        runs = {name: run_child(["bench_reference_memory.py", "--measure", name, "--model", str(root),
                                 "--latent-side", str(args.latent_side), "--steps", str(args.steps),
                                 "--threads", str(args.threads)])
                for name in CONFIGS}
    peak = {name: r["peak_mb"] for name, r in runs.items()}
    print(json.dumps({
        "benchmark": "reference_memory",
        "model": f"CogVideoX transformer, {LAYERS} layers x {HEADS} heads x {HEAD_DIM}, fp32, random weights",
        "latents": [1, 3, 4, args.latent_side, args.latent_side], "steps": args.steps, "threads": args.threads,
        "device": "cpu", "torch": torch.__version__, "measure": MEASURE,
        "note": "on a CPU the reference on the device and on the CPU hold the same RAM",
        "peak_mb": peak,
        "ratios": {
            "lora_dpo_over_lora_sft": round(peak["lora_dpo"] / peak["lora_sft"], 3),
            "full_dpo_reference_on_device_over_full_sft": round(peak["full_dpo_reference_on_device"] / peak["full_sft"], 3),
            "full_dpo_reference_on_cpu_over_full_sft": round(peak["full_dpo_reference_on_cpu"] / peak["full_sft"], 3),
            "full_dpo_precomputed_reference_over_full_sft":
                round(peak["full_dpo_precomputed_reference"] / peak["full_sft"], 3),
        },
        "targets": {"lora_dpo_over_lora_sft": 1.1, "full_dpo_precomputed_reference_over_full_sft": 1.1},
        "runs": runs,
    }, indent=2))


if __name__ == "__main__":
    main()
