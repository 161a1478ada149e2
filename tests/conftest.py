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
# Under pytest-xdist (`make test` runs one worker per core) each worker and the CLI subprocesses it
# starts use one thread: two workers of two threads each on two cores run slower than one.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Each test leaves os.environ as it found it. Lightning writes its launch variables into the process that ran
    DDP (LOCAL_RANK, NODE_RANK, MASTER_PORT stay after the run, even on one device, as the VideoTuna host's default
    strategy does): left in a pytest worker, they reach every later test's subprocesses, and a 2-process run started
    there waited for a rank 1 that Lightning never started (issue #13)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def ddp_env(**extra: str) -> dict[str, str]:
    """The environment of a 2-process DDP subprocess: this one's, plus ``MASTER_PORT``, a free port below the
    ephemeral range (see ``jobs.free_port_below_ephemeral``)."""
    from videotuna_dpo.jobs import free_port_below_ephemeral

    return {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port_below_ephemeral()), **extra}

def run_ddp(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command that starts 2 DDP ranks; every rank's output lands in ``cwd/ddp.stdout|stderr``.

    Lightning starts rank 1 as a child that inherits rank 0's output, so both ranks write to the files. The
    command runs in its own process group: on a timeout the whole group (rank 1 included, which would
    otherwise outlive rank 0) is killed and the test fails with both ranks' output, instead of a bare
    ``TimeoutExpired`` that loses it.
    """
    out_path, err_path = Path(cwd) / "ddp.stdout", Path(cwd) / "ddp.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            pytest.fail(f"DDP run still going after {timeout} s, killed; stdout:\n{out_path.read_text()[-4000:]}\n"
                        f"stderr:\n{err_path.read_text()[-8000:]}")
        finally:
            try:  # a rank left behind by a rank 0 that exited
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(args, proc.returncode, out_path.read_text(), err_path.read_text())


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


@pytest.fixture
def umask_022():
    """Run the test under umask 022, as a typical login shell does."""
    old = os.umask(0o022)
    yield
    os.umask(old)


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


@pytest.fixture(scope="session")
def tiny_cogvideox(tmp_path_factory) -> Path:
    """A tiny random-weight CogVideoX saved in the diffusers layout users load from."""
    from videotuna_dpo.models.tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("tiny_cogvideox") / "CogVideoX-tiny")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from tests.datasets import write_official_dataset

    return write_official_dataset(
        tmp_path_factory.mktemp("prefs"), ["a red square moving right", "a blue square moving right"]
    )


def make_backend(pretrained, **overrides):
    from omegaconf import OmegaConf

    from videotuna_dpo.models.cogvideox import CogVideoXBackend

    cfg = {"name": "cogvideox", "pretrained": str(pretrained), "weight_dtype": "fp32", "lora": {"rank": 4, "alpha": 4}}
    cfg.update(overrides)
    return CogVideoXBackend.from_config(OmegaConf.create(cfg))


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """Tiny random-weight Wan2.1, Wan2.2-A14B (two experts) and Wan2.2-TI2V-5B, by variant, built on first use."""
    from videotuna_dpo.models.tiny import build_tiny_wan

    root = tmp_path_factory.mktemp("tiny_wan")
    built: dict[str, Path] = {}

    def get(variant: str = "2.1") -> Path:
        if variant not in built:
            built[variant] = build_tiny_wan(root / variant, variant)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_hunyuan_video(tmp_path_factory) -> Path:
    """A tiny random-weight HunyuanVideo saved in the diffusers layout users load from."""
    from videotuna_dpo.models.tiny import build_tiny_hunyuan_video

    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("tiny_hunyuan_video") / "HunyuanVideo-tiny")
