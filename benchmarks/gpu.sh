#!/usr/bin/env bash
# LoRA-DPO on the real CogVideoX-2B and Wan2.1-1.3B architectures (random weights, published configs) at native
# resolution, on a GPU: peak GB, s/step, excess, and FSDP on 1 GPU vs 2 when there are 2. Writes
# benchmarks/gpu_results.json and prints it. Needs a CUDA GPU; on one with less memory than the native-resolution
# activations take, add --gradient-checkpointing.
#   benchmarks/gpu.sh [gpu_bench.py options, e.g. --models wan2.1-1.3b --no-fsdp --gradient-checkpointing]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); run it on a GPU machine" >&2
    echo "  (benchmarks/gpu_bench.py --tiny runs the same code on the CPU, as a check that it runs)" >&2
    exit 2
fi
out="$HERE/gpu_results.json"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$HERE/gpu_bench.py" "$@" > "$out.tmp"
mv "$out.tmp" "$out"
cat "$out"
