"""Every registered model backend runs the user's whole loop, as a user runs it.

generate (2 prompts x 2 samples, list seeds) -> score -> pairs -> cache -> train 2 steps from the cache and
from pixels (the first logged loss is log 2: policy == reference at step 0 in the real training loop) ->
eval against the base -> generate with the tuned weights; plus a 2-process DDP run (gloo, CPU) that ends
with identical weights on both ranks. A backend joins by being registered and given a tiny recipe here:
a registered backend without one fails ``test_every_registered_backend_has_a_conformance_recipe``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT, ddp_env, run_ddp
from tests.videotuna_fixtures import (STANDIN, tiny_flow_section, tiny_wan_section, use_standin, write_turbo_lora,
                                      write_vc2_ckpt, write_wan_ckpt)

PROMPTS = ["a red square moving left", "a blue circle moving up"]
SCORERS = "temporal_flickering,dynamic_degree,motion_smoothness"
TRAINER = {"max_steps": 2, "accelerator": "cpu", "devices": 1, "precision": "32-true", "log_every_n_steps": 1,
           "enable_model_summary": False, "enable_progress_bar": False}


def _vc2_model(root: Path, name: str) -> dict:
    use_standin()
    section = tiny_flow_section()
    ckpt = root / "vc2" / "model.ckpt"
    if not ckpt.is_file():
        write_vc2_ckpt(ckpt, section)
        write_turbo_lora(root / "vc2" / "unet_lora.pt", section, rank=4)
    model = {"name": name, "flow": section, "ckpt": str(ckpt)}
    if name == "t2v_turbo":
        model.update(lora_ckpt=str(root / "vc2" / "unet_lora.pt"), lora_rank=4)
    return model


def _cogvideox_model(root: Path, rotary: bool) -> dict:
    from videotuna_dpo.models.tiny import build_tiny_cogvideox

    path = root / ("cogvideox_rope" if rotary else "cogvideox")
    if not path.is_dir():
        build_tiny_cogvideox(path, rotary=rotary)
    return {"name": "cogvideox", "pretrained": str(path), "finetune": "lora", "weight_dtype": "fp32",
            "lora": {"rank": 4, "alpha": 4}}


def _wan_model(root: Path, variant: str) -> dict:
    from videotuna_dpo.models.tiny import build_tiny_wan

    path = root / f"wan-{variant}"
    if not path.is_dir():
        build_tiny_wan(path, variant)
    return {"name": "wan", "pretrained": str(path), "finetune": "lora", "weight_dtype": "fp32",
            "max_sequence_length": 16, "lora": {"rank": 4, "alpha": 4}}


def _hunyuan_video_model(root: Path) -> dict:
    from videotuna_dpo.models.tiny import build_tiny_hunyuan_video

    path = root / "hunyuan_video"
    if not path.is_dir():
        build_tiny_hunyuan_video(path)
    return {"name": "hunyuanvideo", "pretrained": str(path), "finetune": "lora", "weight_dtype": "fp32",
            "vae_dtype": "fp32", "max_sequence_length": 16, "lora": {"rank": 4, "alpha": 4}}


def _wan_videotuna_model(root: Path) -> dict:
    use_standin()
    folder = root / "Wan2.1-T2V-tiny"
    section = tiny_wan_section(folder)
    if not folder.is_dir():
        write_wan_ckpt(folder, section)
    return {"name": "wan_videotuna", "flow": section, "ckpt": str(folder), "lora": {"rank": 4, "alpha": 4}}


# name -> (registered backend, model block builder, frames, sampler steps, guidance, data/dpo extras)
RECIPES = {
    "toy": ("toy", lambda root: {"name": "toy", "pretrained": "builtin", "finetune": "full"}, 8, 4, 3.0, {}),
    # Flow-DPO with the default dpo config (beta on the velocity error): the first loss is log 2 all the same.
    "toy_flow": ("toy_flow", lambda root: {"name": "toy_flow", "pretrained": "builtin", "finetune": "full"}, 8, 4, 3.0,
                 {}),
    "cogvideox": ("cogvideox", lambda root: _cogvideox_model(root, False), 9, 2, 2.0, {}),
    "cogvideox_rope": ("cogvideox", lambda root: _cogvideox_model(root, True), 9, 2, 2.0, {}),
    # VC2 and T2V-Turbo as their shipped configs train: stride 4 (these 8-frame samples fall back to stride
    # 2), caption dropout 0.2, VC2 in full fine-tune with the paper's frozen reference copy.
    "videocrafter2": ("videocrafter2", lambda root: _vc2_model(root, "videocrafter2"), 8, 4, 12.0,
                      {"data": {"frame_stride": 4}, "dpo": {"uncond_prob": 0.2}}),
    "t2v_turbo": ("t2v_turbo", lambda root: _vc2_model(root, "t2v_turbo"), 8, 2, 7.5,
                  {"data": {"frame_stride": 4}, "dpo": {"uncond_prob": 0.2}}),
    # Flow-DPO: Wan's causal VAE takes 4k+1 frames; the two-expert Wan2.2-A14B routes by noise level.
    "wan": ("wan", lambda root: _wan_model(root, "2.1"), 9, 2, 5.0, {"data": {"video_length": 5}}),
    "wan_a14b": ("wan", lambda root: _wan_model(root, "2.2-a14b"), 9, 2, 4.0,
                 {"data": {"video_length": 5}, "dpo": {"uncond_prob": 0.1}}),
    # HunyuanVideo's causal VAE takes 4k+1 frames; the eps-equivalent beta and caption dropout run through the
    # whole loop here (dropout swaps the packed Llama + CLIP conditioning for the empty caption's).
    "hunyuanvideo": ("hunyuanvideo", _hunyuan_video_model, 9, 2, 6.0,
                     {"data": {"video_length": 5}, "dpo": {"beta_schedule": "eps_equivalent", "uncond_prob": 0.2}}),
    # Wan through VideoTuna's WanVideoModelFlow as configs/videotuna/wan_dpo.yaml trains it: 4n+1 frames, LoRA,
    # beta on the implied noise error.
    "wan_videotuna": ("wan_videotuna", _wan_videotuna_model, 5, 2, 5.0,
                      {"data": {"video_length": 5}, "dpo": {"beta_schedule": "eps_equivalent"}}),
}


def write_config(root: Path, recipe: str) -> Path:
    """The backend's tiny training config, written as a user's YAML (no dpo overrides: the defaults)."""
    _, model, frames, steps, guidance, extras = RECIPES[recipe]
    cfg = OmegaConf.create({
        "plugins": ["dpo"], "seed": 0, "output_dir": str(root / "run"), "model": model(root),
        "data": {"name": "preference", "train_data": "???", "video_length": 4, "frame_stride": 1,
                 "resolution": [32, 32], "batch_size": 2, "num_workers": 0, "shuffle": False},
        "optimizer": {"lr": 1.0e-3, "weight_decay": 0.0},
        "lightning": {"trainer": TRAINER, "checkpoint": {"every_n_train_steps": 2}},
        "generate": {"num_frames": frames, "steps": steps, "guidance": guidance, "height": 32, "width": 32,
                     "batch_size": 2, "lossless": True},
        "eval": {"scorers": SCORERS.split(",")},
    })
    cfg = OmegaConf.merge(cfg, extras)
    path = root / "config.yaml"
    OmegaConf.save(cfg, path)
    return path


def cli(*args) -> None:
    from videotuna_dpo.cli import main

    code = main([str(a) for a in args])
    assert code == 0, f"videotuna {' '.join(map(str, args[:1]))} exited {code}"


def first_logged_loss(run: Path) -> float:
    rows = list(csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")))
    return float(next(r["train/loss"] for r in rows if r.get("train/loss")))


@pytest.fixture(scope="module", params=sorted(RECIPES))
def loop(request, tmp_path_factory):
    """The whole loop through the CLI for one backend; returns what each verb wrote."""
    root = tmp_path_factory.mktemp(f"conformance_{request.param}")
    config = write_config(root, request.param)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    data = f"data.train_data={root / 'ds' / 'train_data.yaml'}"
    torch.manual_seed(0)
    cli("generate", "--config", config, "--prompts", root / "prompts.txt", "--num-samples", 2, "--out", root / "samples")
    cli("score", "--videos", root / "samples", "--out", root / "scores.jsonl", "--scorers", SCORERS, "--no-progress")
    cli("pairs", "--scores", root / "scores.jsonl", "--out", root / "ds", "--alpha", 0)
    cli("cache", "--config", config, "--data", root / "ds", "--out", root / "cache")
    cli("train", "--strategy", "dpo", "--config", config, data, f"data.cache={root / 'cache'}",
        f"output_dir={root / 'run_cache'}")
    cli("train", "--strategy", "dpo", "--config", config, data, f"output_dir={root / 'run'}")
    cli("eval", "--config", config, "--prompts", root / "prompts.txt", "--weights", root / "run", "--num-samples", 1,
        "--out", root / "report", "--seed", 1000, "--no-progress")
    cli("generate", "--config", config, "--prompts", root / "prompts.txt", "--num-samples", 1,
        "--out", root / "tuned", "--weights", root / "run" / "weights" / "last")
    return request.param, root, config


def test_every_registered_backend_has_a_conformance_recipe():
    from videotuna_dpo.registry import Registry

    registered = set(Registry.load().names("model"))
    covered = {backend for backend, *_ in RECIPES.values()}
    assert registered <= covered, f"backends without a conformance recipe: {sorted(registered - covered)}"


# The blocks FSDP wraps one by one (strategy.wrap_blocks): the classes the network names in _no_split_modules, or
# the backend's fsdp_blocks for VideoTuna's lvdm UNet, which names none; the toys wrap whole.
FSDP_BLOCKS = {
    "toy": None, "toy_flow": None,
    "cogvideox": {"CogVideoXBlock", "CogVideoXPatchEmbed"}, "cogvideox_rope": {"CogVideoXBlock", "CogVideoXPatchEmbed"},
    "videocrafter2": {"TimestepEmbedSequential"}, "t2v_turbo": {"TimestepEmbedSequential"},
    "wan": {"WanTransformerBlock"}, "wan_a14b": {"WanTransformerBlock"},
    "hunyuanvideo": {"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock", "HunyuanVideoTokenRefiner",
                     "HunyuanVideoPatchEmbed"},
    "wan_videotuna": {"WanAttentionBlock"},
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_fsdp_wraps_each_backend_block_by_block(recipe, tmp_path, capsys):
    from videotuna_dpo.registry import Registry
    from videotuna_dpo.strategy import wrap_blocks

    backend_name, model, *_ = RECIPES[recipe]
    backend = Registry.load().get("model", backend_name).from_config(OmegaConf.create(model(tmp_path)))
    capsys.readouterr()
    kwargs = {"strategy": "fsdp", "devices": 2}
    wrap_blocks(backend, kwargs)
    printed = capsys.readouterr().out
    expected = FSDP_BLOCKS[recipe]
    if expected is None:
        assert kwargs["strategy"] == "fsdp" and "FSDP wraps the whole model as one unit" in printed
        return
    classes = kwargs["strategy"].kwargs["auto_wrap_policy"]._module_classes
    assert {c.__name__ for c in classes} == expected
    denoisers = [getattr(backend, attr) for attr in backend.denoiser_attrs]
    for cls in classes:  # each class is one the network has, not only a name on its list
        assert any(isinstance(m, cls) for net in denoisers for m in net.modules()), cls.__name__
    assert printed == f"lightning.trainer.strategy=fsdp: FSDP shards each of {', '.join(sorted(expected))}\n"


def test_generate_writes_every_sample_with_its_own_seed(loop):
    name, root, _ = loop
    records = [json.loads((root / "samples" / f"p{i:05d}_s{k}.json").read_text()) for i in range(2) for k in range(2)]
    assert [r["seed"] for r in records] == [0, 1, 2, 3]
    frames = RECIPES[name][2]
    from videotuna_dpo.data.video_io import read_video

    assert tuple(read_video(root / "samples" / "p00001_s1.mp4").shape) == (frames, 3, 32, 32)
    assert len(list((root / "tuned").glob("*.mp4"))) == 2


def test_a_video_is_the_same_whatever_its_batch(loop):
    name, root, config = loop
    from videotuna_dpo.pipeline.generate import load_backend
    from videotuna_dpo.registry import Registry

    cfg = OmegaConf.load(config)
    backend = load_backend(cfg, Registry.load(["dpo"]))
    gen = cfg.generate
    kw = dict(num_frames=gen.num_frames, steps=gen.steps, guidance=gen.guidance, height=32, width=32)
    batched = backend.generate(PROMPTS, seed=[5, 9], **kw)
    alone = backend.generate(PROMPTS[1:], seed=[9], **kw)
    assert batched.shape[0] == 2
    assert torch.allclose(batched[1], alone[0], atol=1e-4)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)


def test_score_and_pairs_produce_a_dataset(loop):
    _, root, _ = loop
    scores = [json.loads(line) for line in (root / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and all(s["status"] == "ok" for s in scores)
    pairs = json.loads((root / "ds" / "pairs" / "pair.json").read_text())
    assert len(pairs) == 2


def test_training_starts_at_log_2_from_the_cache_and_from_pixels(loop):
    _, root, _ = loop
    for run in ("run", "run_cache"):
        assert first_logged_loss(root / run) == pytest.approx(math.log(2), abs=1e-4), run
        assert json.loads((root / run / "run.json").read_text())["global_step"] == 2


def test_training_on_a_precomputed_reference_starts_at_log_2(loop):
    """dpo.precompute_reference: the pre-pass stores every pair's draws; the policy alone then matches them at step 0."""
    _, root, config = loop
    cache = root / "cache_precomputed"
    shutil.copytree(root / "cache", cache, ignore=shutil.ignore_patterns("reference"))
    cli("train", "--strategy", "dpo", "--config", config, f"data.train_data={root / 'ds' / 'train_data.yaml'}",
        f"data.cache={cache}", f"output_dir={root / 'run_precomputed'}", "dpo.precompute_reference=true",
        "dpo.reference_draws=2")
    rows = list(csv.DictReader(open(root / "run_precomputed" / "logs" / "version_0" / "metrics.csv")))
    first = next(r for r in rows if r.get("train/loss"))
    # The stored errors come from other batches than the step's: float noise (~1e-7) that beta / 2 amplifies.
    for side in ("w", "l"):
        assert float(first[f"train/model_err_{side}"]) == pytest.approx(float(first[f"train/ref_err_{side}"]), rel=1e-5)
    assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-3)
    index = json.loads((cache / "reference" / "index.json").read_text())
    assert len(index["pairs"]) == len(json.loads((root / "ds" / "pairs" / "pair.json").read_text())) == 2


def test_eval_compares_the_tuned_weights_with_the_base(loop):
    _, root, _ = loop
    report = json.loads((root / "report" / "report.json").read_text())
    assert (root / "report" / "report.html").is_file()
    assert report["counts"]["base"]["scored"] == report["counts"]["run"]["scored"] == 2
    rows = {r["dimension"]: r for r in report["tables"]["run"]["rows"]}
    assert rows["omniscore"]["n"] == 2
    assert rows["omniscore"]["delta"] == pytest.approx(rows["omniscore"]["tuned"] - rows["omniscore"]["base"])


DDP_DRIVER = textwrap.dedent('''
    """Train through the CLI under DDP; each rank writes its trainable tensors when training ends, and every
    rank records what it writes of the run's outputs (config, run.json, exported weights) in writes-rank<r>.txt."""
    import os
    import sys
    from pathlib import Path

    from safetensors.torch import save_file

    from videotuna_dpo import strategy
    from videotuna_dpo.cli import main

    out = Path(sys.argv[1])


    def rank():
        return os.environ.get("LOCAL_RANK", "0")  # Lightning sets it in the processes it starts


    def record(what):
        with open(out / f"writes-rank{rank()}.txt", "a") as handle:
            handle.write(what + "\\n")


    def logged(name, write):
        def wrapper(path, *args, **kwargs):
            record(f"{name} {Path(path).relative_to(out)}")
            return write(path, *args, **kwargs)
        return wrapper


    strategy.write_text_atomic = logged("text", strategy.write_text_atomic)
    strategy.write_json_atomic = logged("json", strategy.write_json_atomic)
    base_end = strategy.ExportTrainableWeights.on_train_end

    def on_train_end(self, trainer, pl_module):
        tensors = {str(i): p.detach().cpu().contiguous() for i, p in enumerate(pl_module.backend.trainable_parameters())}
        save_file(tensors, str(out / f"rank{trainer.global_rank}.safetensors"))
        base_end(self, trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        pl_module.backend.save_trainable = logged("weights", pl_module.backend.save_trainable)

    strategy.ExportTrainableWeights.on_train_end = on_train_end
    strategy.ExportTrainableWeights.on_train_start = on_train_start
    sys.exit(main(sys.argv[2:]))
''')


def test_ddp_on_two_processes_ends_with_identical_weights_on_both_ranks(loop):
    """Two gloo processes train 2 steps, then resume from the step-2 checkpoint to step 3: both ranks hold the same
    weights each time, and only rank 0 writes the run's config, run.json and exported weights."""
    from safetensors.torch import load_file

    name, root, config = loop
    out = root / "ddp"
    out.mkdir()
    driver = out / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    env = ddp_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(STANDIN), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, str(driver), str(out), "train", "--strategy", "dpo", "--config", str(config),
               f"data.train_data={root / 'ds' / 'train_data.yaml'}", f"output_dir={out / 'run'}", "data.batch_size=1",
               "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp", "lightning.checkpoint.every_n_train_steps=2",
               "lightning.checkpoint.export_weights=true"]
    for steps, resume in ((2, []), (3, ["--resume", "last"])):
        for old in out.glob("writes-rank*.txt"):
            old.unlink()
        proc = run_ddp(command[:4] + resume + command[4:] + [f"lightning.trainer.max_steps={steps}"], env=env, cwd=out)
        assert proc.returncode == 0, proc.stderr[-4000:]
        ranks = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys() and ranks[0]
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
        assert json.loads((out / "run" / "run.json").read_text())["global_step"] == steps
        assert not (out / "writes-rank1.txt").exists()
        written = (out / "writes-rank0.txt").read_text().splitlines()
        assert written == ["text run/config.yaml", *(["weights run/weights/step-2"] if steps == 2 else []),
                           "weights run/weights/last", "json run/run.json"], written
    assert (out / "run" / "checkpoints" / "step-2.ckpt").is_file()


def test_cache_records_the_weights_it_was_built_from_and_the_empty_caption(loop):
    name, root, config = loop
    index = json.loads((root / "cache" / "index.json").read_text())
    model = OmegaConf.load(config).model
    built_from = model.get("pretrained") or model.get("ckpt")
    expected = built_from if built_from == "builtin" else str(Path(built_from).resolve())
    assert index["settings"]["pretrained"] == expected and index["settings"]["backend"] == RECIPES[name][0]
    assert sorted(index["captions"]) == sorted(["", *PROMPTS]) and len(index["videos"]) == 4
