"""The GPU benchmark's script runs: ``benchmarks/gpu_bench.py --tiny`` on the CPU, with tiny configs of both families;
``benchmarks/gpu.sh`` without a GPU says so and stops."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_gpu_bench():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--tiny", "--repeats", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("model", ["cogvideox-2b", "wan2.1-1.3b"])
def test_gpu_bench_tiny_reports_time_excess_and_memory_of_lora_dpo(tiny_gpu_bench, model):
    out = tiny_gpu_bench
    assert out["tiny"] is True and out["device"] == "cpu" and set(out["models"]) == {"cogvideox-2b", "wan2.1-1.3b"}
    entry = out["models"][model]
    lora = entry["lora"]
    assert lora["t_sft_s"] > 0 and lora["t_ref_s"] > 0 and lora["s_per_step"] > 0
    # The excess is the one bench_dpo_overhead defines, from the three times printed (rounded to 6 places: at 4 a tiny run's millisecond reference time carried a 1-2% rounding error).
    assert lora["excess"] == pytest.approx((lora["s_per_step"] - lora["t_sft_s"]) / lora["t_ref_s"], rel=0.01, abs=0.002)
    assert lora["peak_gb"] > 0 and lora["peak_gb_sft"] > 0
    assert lora["memory_dpo_over_sft"] == pytest.approx(lora["peak_gb"] / lora["peak_gb_sft"], abs=0.01)
    assert "VmHWM" in lora["memory_measure"]
    # LoRA rank 32: only adapters train, a small share of the (tiny) transformer.
    assert 0 < lora["trainable_parameters"] < lora["parameters"]
    assert entry["latents"] == ([3, 4, 8, 8] if model == "cogvideox-2b" else [16, 3, 4, 4])
    # Lightning's FSDP refuses the CPU: said so, rather than a figure.
    assert entry["fsdp"] == {n: {"devices": int(n), "skipped": "Lightning's FSDP strategy refuses the CPU accelerator"}
                             for n in ("1", "2")}

def test_gpu_sh_fails_clearly_without_cuda(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "no CUDA GPU visible" in proc.stderr and "gpu_bench.py --tiny" in proc.stderr
    assert not (ROOT / "benchmarks" / "gpu_results.json.tmp").exists()
