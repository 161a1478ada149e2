"""``make bench``: run every ``benchmarks/bench_*.py``, collect their JSON into ``benchmarks/results.json``.

Each benchmark prints one JSON object on stdout (its last line-spanning object); a benchmark that fails
is recorded with its exit status and the tail of its stderr, and the others still run. The file also
records the machine (CPU count, torch version and threads, GPU if any) and the date, since every figure
depends on them. Prints the file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(script: Path) -> dict:
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    start = proc.stdout.find("{")
    if proc.returncode != 0 or start < 0:
        return {"failed": True, "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    return json.loads(proc.stdout[start:])


def main() -> None:
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "benchmarks": {},
    }
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        results["benchmarks"][script.stem.removeprefix("bench_")] = run(script)
    out = HERE / "results.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print(out.read_text())
    failed = [name for name, r in results["benchmarks"].items() if r.get("failed")]
    if failed:
        sys.exit(f"failed: {', '.join(failed)} (see benchmarks/results.json)")


if __name__ == "__main__":
    main()
