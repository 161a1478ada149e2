"""LoRA-DPO on the real CogVideoX-2B and Wan2.1-T2V-1.3B architectures at native resolution, on a GPU.

Each transformer is built from its published config values (random weights, nothing downloaded) into the
tiny pipeline of its family (the scheduler; no VAE or text encoder loads: batches are latent-cache batches of
the native latent shape). Per model: peak memory of a DPO and of an SFT step (``torch.cuda.max_memory_allocated``),
seconds per DPO step, and ``excess = (t_dpo - t_sft) / t_ref`` as ``bench_dpo_overhead`` defines it; then the
same DPO step under Lightning's FSDP (full sharding, each transformer block a unit, fp32 weights computed in
bf16-mixed) on 1 GPU and, when there are 2, on 2 (one pair per GPU).

``benchmarks/gpu.sh`` runs it. ``--tiny`` runs the single-device part on the CPU with the tiny configs of both
families (memory then is the process's whole peak resident memory, imports included), so the script is known
to run where no GPU is; FSDP it cannot check there (Lightning's FSDP strategy refuses the CPU accelerator).
Prints one JSON object. Run: python benchmarks/gpu_bench.py [--tiny] [--models cogvideox-2b,wan2.1-1.3b]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Published transformer configs (THUDM/CogVideoX-2b, Wan-AI/Wan2.1-T2V-1.3B-Diffusers), and their native latents:
# CogVideoX-2B: 49 frames of 480x720 -> [13, 16, 60, 90] ([F', C', H', W'], 4x time, 8x space), 226 T5 tokens;
# Wan2.1-1.3B: 81 frames of 480x832 -> [16, 21, 60, 104] ([C', F', H', W']), 512 UMT5 tokens.
MODELS = {
    "cogvideox-2b": {
        "family": "cogvideox", "class": "CogVideoXTransformer3DModel", "block": "diffusers.models.transformers.cogvideox_transformer_3d:CogVideoXBlock",
        "config": dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                       text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49,
                       patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226, flip_sin_to_cos=True,
                       freq_shift=0, activation_fn="gelu-approximate", attention_bias=True, norm_eps=1e-5,
                       spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0,
                       use_rotary_positional_embeddings=False),
        "latents": (13, 16, 60, 90), "text": (226, 4096), "video": "49 frames, 480x720",
        "tiny_latents": (3, 4, 8, 8), "tiny_text": (16, 32),
    },
    "wan2.1-1.3b": {
        "family": "wan", "class": "WanTransformer3DModel", "block": "diffusers.models.transformers.transformer_wan:WanTransformerBlock",
        "config": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                       rope_max_seq_len=1024),
        "latents": (16, 21, 60, 104), "text": (512, 4096), "video": "81 frames, 480x832",
        "tiny_latents": (16, 3, 4, 4), "tiny_text": (16, 32),
    },
}


def build_model(name: str, root: Path, tiny: bool, device: str) -> Path:
    """The family's tiny pipeline, its transformer replaced by the real architecture (random weights) unless tiny."""
    import diffusers

    from videotuna_dpo.models.tiny import build_tiny_cogvideox, build_tiny_wan

    spec = MODELS[name]
    build_tiny_cogvideox(root) if spec["family"] == "cogvideox" else build_tiny_wan(root, "2.1")
    if not tiny:
        torch.manual_seed(0)
        with torch.device(device):
            transformer = getattr(diffusers, spec["class"])(**spec["config"]).to(torch.bfloat16)
        transformer.save_pretrained(root / "transformer", safe_serialization=True)
        del transformer
        torch.cuda.empty_cache()
    return root


def backend_of(name: str, root: Path, tiny: bool, device: str, checkpointing: bool = False, dtype: str | None = None):
    from omegaconf import OmegaConf

    from videotuna_dpo.models.cogvideox import CogVideoXBackend
    from videotuna_dpo.models.wan import WanBackend

    spec = MODELS[name]
    cls = CogVideoXBackend if spec["family"] == "cogvideox" else WanBackend
    cfg = {"name": spec["family"], "pretrained": str(root), "finetune": "lora", "load_text_and_vae": False,
           "weight_dtype": dtype or ("fp32" if tiny else "bf16"), "lora": {"rank": 32, "alpha": 32},
           "gradient_checkpointing": checkpointing}
    return cls.from_config(OmegaConf.create(cfg)).to(device)


def latent_batch(name: str, tiny: bool, pairs: int, device: str, seed: int = 0) -> dict:
    spec = MODELS[name]
    g = torch.Generator().manual_seed(seed)
    shape = (pairs, *spec["tiny_latents" if tiny else "latents"])
    text = (pairs, *spec["tiny_text" if tiny else "text"])
    return {"winner_latents": torch.randn(shape, generator=g).to(device),
            "loser_latents": torch.randn(shape, generator=g).to(device),
            "prompt_embeds": torch.randn(text, generator=g).to(device), "caption": ["a"] * pairs}


class Memory:
    """Peak memory of what runs between ``reset()`` and ``peak_gb()``: CUDA's allocator, or the CPU process's resident size."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.measure = "torch.cuda.max_memory_allocated" if self.cuda else \
            "peak resident memory of the process (VmHWM, reset by /proc/self/clear_refs)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from bench_reference_memory import reset_peak

            reset_peak()

    def peak_gb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        from bench_reference_memory import peak_bytes

        return peak_bytes() / 2**30


def single(name: str, root: Path, tiny: bool, device: str, repeats: int, checkpointing: bool = False) -> dict:
    """s/step, excess and peak memory of LoRA-DPO (and SFT) on one device."""
    from omegaconf import OmegaConf

    from videotuna_dpo.losses import per_sample_mse
    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    backend = backend_of(name, root, tiny, device, checkpointing)
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=5000.0)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = latent_batch(name, tiny, 1, device)
    x0, noise, t, cond2 = module.step_inputs(batch)
    noisy, target = backend.add_noise(x0, noise, t), backend.target(x0, noise, t)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def train(loss_fn) -> None:
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sft() -> None:
        train(lambda: per_sample_mse(backend.predict(noisy, t, cond2), target).mean())

    def dpo() -> None:
        train(lambda: module.dpo_step(batch)[0].loss)

    def ref() -> None:
        with torch.no_grad(), backend.reference() as reference:
            reference(noisy, t, cond2)

    times = {"sft": [], "ref": [], "dpo": []}
    for round_ in range(repeats + 1):  # one warm-up round; then the three interleaved
        sample = {"sft": timed(sft), "ref": timed(ref), "dpo": timed(dpo)}
        if round_:
            for key, value in sample.items():
                times[key].append(value)
    t_sft, t_ref, t_dpo = (statistics.median(times[k]) for k in ("sft", "ref", "dpo"))
    memory = Memory(device)
    memory.reset()
    sft()
    peak_sft = memory.peak_gb()
    memory.reset()
    dpo()
    peak_dpo = memory.peak_gb()
    return {"s_per_step": round(t_dpo, 6), "t_sft_s": round(t_sft, 6), "t_ref_s": round(t_ref, 6),
            "excess": round((t_dpo - t_sft) / t_ref, 3), "peak_gb": round(peak_dpo, 3), "peak_gb_sft": round(peak_sft, 3),
            "memory_dpo_over_sft": round(peak_dpo / peak_sft, 3), "memory_measure": memory.measure,
            "parameters": sum(p.numel() for p in backend.transformer.parameters()),
            "trainable_parameters": sum(p.numel() for p in backend.trainable_parameters())}


def fsdp_train(args: argparse.Namespace) -> None:
    """(both ranks run this) DPO steps under Lightning's FSDP; rank 0 writes s/step and its peak memory."""
    import importlib

    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema

    spec = MODELS[args.model]
    # fp32 weights throughout (FSDP flattens each unit's parameters into one tensor of one dtype; Wan keeps its
    # norms and modulation in fp32 under a bf16 load), sharded, computed in bf16 (Lightning's bf16-mixed).
    backend = backend_of(args.model, args.root, False, "cpu", args.gradient_checkpointing, dtype="fp32")
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=5000.0)),
                       OmegaConf.structured(OptimizerSchema(lr=1e-6)), seed=0)
    module_name, _, class_name = spec["block"].partition(":")
    block = getattr(importlib.import_module(module_name), class_name)
    strategy = FSDPStrategy(auto_wrap_policy={block}, use_orig_params=True, sharding_strategy="FULL_SHARD")
    steps, warmup = args.steps, 1
    items = [{k: v[0] for k, v in latent_batch(args.model, False, 1, "cpu", seed=i).items()}
             for i in range(args.devices * (steps + warmup))]
    memory = Memory("cuda")

    class StepTimer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *rest) -> None:
            if trainer.global_step == warmup:
                memory.reset()
                self.start = time.perf_counter()
            elif trainer.global_step == warmup + steps and trainer.is_global_zero:
                torch.cuda.synchronize()
                seconds = (time.perf_counter() - self.start) / steps
                Path(args.out).write_text(json.dumps({
                    "devices": trainer.world_size, "s_per_step": round(seconds, 4), "peak_gb_rank0": round(memory.peak_gb(), 3),
                    "pairs_per_step": trainer.world_size, "memory_measure": memory.measure}))

    trainer = L.Trainer(accelerator="gpu", devices=args.devices, strategy=strategy, precision="bf16-mixed",
                        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StepTimer()])
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=1))


def fsdp(name: str, root: Path, devices: int, steps: int, timeout: float, tmp: Path, checkpointing: bool) -> dict:
    """One FSDP run of ``devices`` processes (Lightning starts the other ranks), in its own process group."""
    out = tmp / f"fsdp-{name}-{devices}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fsdp-train", "--model", name, "--root", str(root),
           "--devices", str(devices), "--steps", str(steps), "--out", str(out)] + \
        (["--gradient-checkpointing"] if checkpointing else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH")]))}
    if devices > 1:
        from bench_scaling import free_port

        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return {"devices": devices, "failed": f"still going after {timeout} s, killed", "stderr_tail": stderr[-2000:]}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0 or not out.is_file():
        return {"devices": devices, "failed": f"exit status {proc.returncode}", "stderr_tail": stderr[-2000:]}
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a check that the script runs)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="measured FSDP steps, after one warm-up step")
    parser.add_argument("--no-fsdp", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="model.gradient_checkpointing: recompute block activations (for a GPU with less memory)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per FSDP run")
    parser.add_argument("--fsdp-train", action="store_true", help="(internal) one FSDP run")
    parser.add_argument("--model")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    if args.fsdp_train:
        fsdp_train(args)
        return
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if args.tiny:
        device, gpus = "cpu", 0
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_bench.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, "
                     "or with --tiny for the CPU check")
        device, gpus = "cuda", torch.cuda.device_count()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            root = build_model(name, tmp / name, args.tiny, device)
            spec = MODELS[name]
            entry = {"video": spec["video"], "latents": list(spec["tiny_latents" if args.tiny else "latents"]),
                     "lora": single(name, root, args.tiny, device, args.repeats, args.gradient_checkpointing)}
            if device == "cuda":
                torch.cuda.empty_cache()
            if args.tiny:
                entry["fsdp"] = {n: {"devices": int(n), "skipped": "Lightning's FSDP strategy refuses the CPU accelerator"}
                                 for n in ("1", "2")}
            elif not args.no_fsdp:
                entry["fsdp"] = {str(n): fsdp(name, root, n, args.steps, args.timeout, tmp, args.gradient_checkpointing) for n in (1, 2)[:gpus]}
                if gpus == 1:
                    entry["fsdp"]["2"] = {"devices": 2, "skipped": "1 GPU on this machine"}
            results[name] = entry
    print(json.dumps({
        "benchmark": "gpu",
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "gpus": gpus, "torch": torch.__version__,
        "weights": "random, from the published configs" if not args.tiny else "random, tiny configs of the same classes",
        "dtype": "bf16 base, fp32 LoRA rank 32" if not args.tiny else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "fsdp": "Lightning FSDPStrategy, FULL_SHARD, one unit per transformer block, fp32 weights, precision bf16-mixed",
        "models": results,
    }, indent=2))


if __name__ == "__main__":
    main()
