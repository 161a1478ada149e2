import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests never touch a network or a GPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def make_distribution(site: Path, dist_name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Write an installed distribution (dist-info + modules) into ``site`` by hand."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist_name.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.2.3\n")
    lines = ["[videotuna]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))


@pytest.fixture(scope="session")
def example_scorer_site(tmp_path_factory) -> Path:
    """hooks/example_scorer installed (for real, by pip) into a private site directory."""
    target = tmp_path_factory.mktemp("example_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "hooks" / "example_scorer")],
        check=True,
    )
    return target
