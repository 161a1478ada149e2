"""``videotuna generate`` on 1 vs 2 CPU processes (``--devices 2``): the same files (checksums), and the wall times.

Backends: the toy (the demo's base) and the tiny random-weight CogVideoX. Each run is a fresh process, startup
and model load included, so the ratio is what a user sees; on a machine other jobs share, it is noisy.
Prints one JSON object.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red square moving right", "a blue circle moving up", "a green square moving down", "a red circle moving left"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def run(tmp: Path, name: str, config: Path, overrides: list[str], devices: int, samples: int) -> dict:
    out = tmp / name
    cmd = [sys.executable, "-m", "videotuna_dpo", "generate", "--config", str(config), "--prompts",
           str(tmp / "prompts.txt"), "--num-samples", str(samples), "--out", str(out), "--no-progress", *overrides]
    if devices > 1:
        cmd[4:4] = ["--devices", str(devices), "--accelerator", "cpu"]
    threads = max(1, (os.cpu_count() or 1) // 2)  # the same threads per process in both runs: the same floats
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "VIDEOTUNA_DIST_TIMEOUT": "120"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": round(seconds, 2), "sha256": digest(out), "files": len(list(out.iterdir()))}


def main() -> None:
    from videotuna_dpo.models.tiny import build_tiny_cogvideox

    results = {"threads_per_process": max(1, (os.cpu_count() or 1) // 2), "cpus": os.cpu_count(), "backends": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
        tiny = build_tiny_cogvideox(tmp / "CogVideoX-tiny")
        setups = {
            "toy": (ROOT / "videotuna_dpo" / "toy" / "demo.yaml", ["output_dir=unused", "generate.batch_size=2"], 4),
            "cogvideox_tiny": (ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml",
                               [f"model.pretrained={tiny}", "generate.batch_size=1", "generate.steps=8"], 2),
        }
        for backend, (config, overrides, samples) in setups.items():
            one = run(tmp, f"{backend}-1", config, overrides, 1, samples)
            two = run(tmp, f"{backend}-2", config, overrides, 2, samples)
            results["backends"][backend] = {
                "videos": len(PROMPTS) * samples, "one_process": one, "two_processes": two,
                "same_files": one["sha256"] == two["sha256"],
                "wall_ratio_two_over_one": round(two["seconds"] / one["seconds"], 3),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
