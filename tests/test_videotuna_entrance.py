"""DPO inside VideoTuna: a VideoTuna-format YAML (flow.target + data.target) trains; shipped configs; missing host."""

import json
import math
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import ddp_env, run_ddp
from tests.videotuna_fixtures import STANDIN, use_standin, vc2_files, wan_files  # noqa: F401
from videotuna_dpo.config import validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.videotuna_host import VideoTunaMissingError

ROOT = Path(__file__).resolve().parents[1]


def _videotuna_yaml(files, train_data, workdir, backend="videocrafter2"):
    model = {"finetune": "lora", "lora": {"rank": 4, "alpha": 4}} if backend == "videocrafter2" else \
        {"lora_rank": 4, "lora_ckpt": str(files["lora"])}
    return OmegaConf.create({
        "flow": {"target": "videotuna_dpo.videotuna_flow.DPOFlow",
                 "params": {"backend": backend, "model": model, "dpo": {"beta": 500}, "flow_config": files["section"]}},
        "train": {"ckpt": str(files["ckpt"]), "trained_ckpt": None, "lorackpt": None, "first_stage_key": "video",
                  "cond_stage_key": "caption", "workdir": str(workdir), "ckptdir": str(workdir / "checkpoints"),
                  "lr_config": {"base_learning_rate": 1.0e-3, "scale_lr": False},
                  "data": {"target": "videotuna_dpo.videotuna_flow.PreferenceData",
                           "params": {"train_data": str(train_data), "batch_size": 2, "video_length": 4,
                                      "resolution": [32, 32], "frame_start": "first"}},
                  "lightning": {"trainer": {"num_nodes": 1, "devices": 1, "accelerator": "cpu", "max_steps": 3,
                                            "enable_progress_bar": False, "enable_model_summary": False,
                                            "enable_checkpointing": False}}},
    })


def _run_like_train_new(config, callbacks=(), ckpt_path=None):
    """scripts/train_new.py's sequence (prepare_train_args' train.mapping, then the flow) with the host's
    instantiate_from_config; ``callbacks`` join the host's, ``ckpt_path`` is ``--resume_ckpt``."""
    from videotuna.utils.common_utils import instantiate_from_config

    for source, target in (OmegaConf.select(config, "train.mapping") or {}).items():
        OmegaConf.update(config, target, OmegaConf.select(config, source))
    flow = instantiate_from_config(config.flow, resolve=True)
    train = config.train
    flow.from_pretrained(train.ckpt, train.trained_ckpt, train.lorackpt)
    flow.init_trainer(train)
    flow.trainer.callbacks.extend(callbacks)
    flow.trainer.fit(flow, flow.data, ckpt_path=ckpt_path)
    return flow


@pytest.mark.parametrize("backend", ["videocrafter2", "t2v_turbo"])
def test_a_videotuna_yaml_with_flow_and_data_targets_trains_dpo(vc2_files, tiny_dataset, tmp_path, backend, capsys):
    config = _videotuna_yaml(vc2_files, tiny_dataset, tmp_path, backend)
    path = tmp_path / "vc2_dpo.yaml"
    OmegaConf.save(config, path)
    torch.manual_seed(0)
    flow = _run_like_train_new(OmegaConf.load(path))
    assert flow.trainer.global_step == 3
    started = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DPO training: ")]
    assert len(started) == 1 and started[0].startswith("DPO training: global batch 2 pairs (2 per device x 1 device(s) "
                                                       "x 1 accumulation); beta 500 ")
    assert "; lr 0.001 per optimizer step" in started[0]
    assert flow._dpo.optim.lr == 1.0e-3  # from train.lr_config, as any VideoTuna run
    trainable = flow.backend.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    assert sum(p.requires_grad for p in flow.parameters()) == len(trainable)  # the host's set_trainable_components undone
    assert flow.denoiser is flow.inner.denoiser
    # The step's metrics come from the same place as `videotuna train`'s (strategy.log_step), sft_loss and lr included.
    logged = flow.trainer.logged_metrics
    assert {k for k in logged if k.startswith("train/")} == {
        "train/loss", "train/implicit_acc", "train/reward_margin", "train/reward_w", "train/reward_l",
        "train/sft_loss", "train/model_err_w", "train/model_err_l", "train/ref_err_w", "train/ref_err_l", "train/lr"}
    assert float(logged["train/lr"]) == pytest.approx(1.0e-3)
    weights = tmp_path / "checkpoints" / "dpo_weights" / "last"
    assert (weights / "trainable.json").is_file()
    again = flow.backend_class(OmegaConf.merge(flow.backend.cfg, {"flow": vc2_files["section"], "trainable_weights": str(weights)}))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(again.trainable_parameters(), trainable))
    # ... and they trained: the start (VC2: peft's zero lora_B; T2V-Turbo: unet_lora.pt) is not what came back.
    start = flow.backend_class(OmegaConf.merge(flow.backend.cfg, {"flow": vc2_files["section"]}))
    pairs = list(zip(start.trainable_parameters(), again.trainable_parameters()))
    if backend == "videocrafter2":  # peft draws lora_A at random: compare the lora_B tensors, which start at zero
        pairs = [(a, b) for a, b in pairs if not a.any()]
    assert pairs and any(not torch.equal(a, b) for a, b in pairs)


def test_lightning_checkpoint_of_the_flow_keeps_only_trainable_tensors(vc2_files, tiny_dataset, tmp_path):
    flow = _run_like_train_new(_videotuna_yaml(vc2_files, tiny_dataset, tmp_path))
    checkpoint = {"state_dict": flow.state_dict()}
    flow.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])


def test_shipped_videotuna_config_points_at_our_targets_with_the_papers_settings():
    use_standin()
    from videotuna.utils.common_utils import get_obj_from_str

    from videotuna_dpo.strategy import DPOSchema
    from videotuna_dpo.videotuna_flow import DPOFlow, PreferenceData

    cfg = OmegaConf.load(ROOT / "configs" / "videotuna" / "vc2_dpo.yaml")
    assert get_obj_from_str(cfg.flow.target) is DPOFlow and get_obj_from_str(cfg.train.data.target) is PreferenceData
    assert cfg.flow.params.flow_config.target == "videotuna.flow.videocrafter.VideocrafterFlow"
    assert cfg.flow.params.flow_config.params.use_scale is True and cfg.flow.params.model.finetune == "full"
    assert validate(cfg.flow.params.dpo, DPOSchema, "dpo").beta == 5000
    assert cfg.train.lr_config.base_learning_rate == 6e-6 and cfg.train.lr_config.scale_lr is False
    data = cfg.train.data.params
    assert (data.batch_size, data.video_length, data.frame_stride, list(data.resolution)) == (1, 16, 4, [320, 512])
    assert cfg.train.lightning.trainer.accumulate_grad_batches == 2


@pytest.mark.parametrize("name,accumulate", [("vc2", 2), ("t2v_turbo", 4)])
def test_shipped_dpo_configs_carry_the_papers_settings(name, accumulate):
    from videotuna_dpo.data.datamodule import PreferenceDataSchema
    from videotuna_dpo.models.t2v_turbo import T2VTurboSchema
    from videotuna_dpo.models.videocrafter import VideoCrafter2Schema
    from videotuna_dpo.strategy import TrainSchema

    source = ROOT / "configs" / "dpo" / f"{name}.yaml"
    cfg = OmegaConf.load(source)
    top = validate(cfg, TrainSchema, "", str(source))
    schema = T2VTurboSchema if name == "t2v_turbo" else VideoCrafter2Schema
    model = validate(cfg.model, schema, "model", str(source))
    data = validate(cfg.data, PreferenceDataSchema, "data", str(source))
    assert (top.dpo.beta, top.optimizer.lr, data.batch_size) == (5000, 6e-6, 1)
    assert (data.video_length, data.frame_stride, list(data.resolution)) == (16, 4, [320, 512])
    assert top.lightning.trainer["accumulate_grad_batches"] == accumulate
    assert (top.dpo.uncond_prob, top.dpo.disable_dropout) == (0.2, True)  # the official caption dropout
    from videotuna_dpo.sampling import GenerateSchema

    gen = validate(cfg.generate, GenerateSchema, "generate", str(source))
    sampler = (gen.num_frames, gen.steps, gen.guidance, gen.height, gen.width)
    if name == "t2v_turbo":
        assert (model.lora_rank, model.num_ddim_timesteps, model.lora_ckpt) == (64, 50, "checkpoints/t2v-turbo/unet_lora.pt")
        assert sampler == (16, 4, 7.5, 320, 512)  # 4 LCM steps
    else:
        assert model.finetune == "full" and model.ddim_eta == 1.0
        assert sampler == (16, 50, 12.0, 320, 512)  # 50 DDIM steps, guidance 12


@pytest.fixture
def without_videotuna(monkeypatch):
    """VideoTuna (the stand-in) not importable: the backends' classes by model name."""
    from videotuna_dpo.models.t2v_turbo import T2VTurboBackend
    from videotuna_dpo.models.videocrafter import VideoCrafter2Backend
    from videotuna_dpo.models.wan_videotuna import WanVideoTunaBackend

    for name in [m for m in sys.modules if m == "videotuna" or m.startswith("videotuna.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "videotuna_standin" not in p])
    return {"videocrafter2": VideoCrafter2Backend, "t2v_turbo": T2VTurboBackend, "wan_videotuna": WanVideoTunaBackend}


@pytest.mark.parametrize("backend,extra_key", [("videocrafter2", "model.ckpt"), ("t2v_turbo", "model.lora_ckpt"),
                                               ("wan_videotuna", "model.ckpt")])
def test_without_videotuna_choosing_these_backends_fails_at_once_and_says_how_to_fix_it(without_videotuna, backend,
                                                                                        extra_key):
    cls = without_videotuna[backend]
    cfg = {"name": backend, "host_config": "configs/dpo/vc2.yaml", "ckpt": "model.ckpt", "lora_ckpt": "unet_lora.pt"}
    if backend != "t2v_turbo":
        cfg.pop("lora_ckpt")
    # host_config is any YAML with a flow section; the import fails before any file is read.
    cfg["flow"] = {"target": "videotuna.flow.videocrafter.VideocrafterFlow", "params": {}}
    with pytest.raises(VideoTunaMissingError) as err:
        cls.from_config(OmegaConf.create(cfg))
    message = str(err.value)
    for needed in (f"model.name={backend} needs VideoTuna", "PYTHONPATH", "not a PyPI package",
                   "model.host_config", extra_key, "github.com/VideoVerses/VideoTuna"):
        assert needed in message, needed


@pytest.mark.parametrize("backend", ["videocrafter2", "t2v_turbo", "wan_videotuna"])
def test_without_videotuna_a_config_lacking_its_keys_is_told_videotuna_is_missing_first(without_videotuna, backend):
    with pytest.raises(VideoTunaMissingError) as err:  # not "missing model.ckpt" / "set model.host_config"
        without_videotuna[backend].from_config(OmegaConf.create({"name": backend}))
    assert str(err.value).startswith(f"model.name={backend} needs VideoTuna (https://github.com/VideoVerses/VideoTuna)")


def test_videotuna_train_strategy_dpo_runs_the_vc2_backend(vc2_files, tiny_dataset, tmp_path):
    """Way one: DPOStrategy.run (lightning.Trainer) over the VideoTuna-backed backend, via the registry names."""
    from videotuna_dpo.data.datamodule import PreferenceDataModule
    from videotuna_dpo.models.videocrafter import VideoCrafter2Backend
    from videotuna_dpo.strategy import DPOStrategy

    class Registry:
        def get(self, kind, name):
            return {("model", "videocrafter2"): VideoCrafter2Backend, ("datamodule", "preference"): PreferenceDataModule}[(kind, name)]

        def names(self, kind):
            return ["videocrafter2"]

    cfg = OmegaConf.create({
        "output_dir": str(tmp_path / "run"),
        "model": {"name": "videocrafter2", "flow": vc2_files["section"], "ckpt": str(vc2_files["ckpt"]),
                  "finetune": "lora", "lora": {"rank": 4, "alpha": 4}},
        "data": {"name": "preference", "train_data": str(tiny_dataset), "video_length": 4, "resolution": [32, 32],
                 "batch_size": 2},
        "dpo": {"beta": 500}, "optimizer": {"lr": 1e-3},
        "lightning": {"trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False,
                                  "enable_model_summary": False}, "checkpoint": {"every_n_train_steps": 2}},
    })
    out = DPOStrategy.run(cfg, Registry())
    assert (out / "weights" / "last" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_log_images_samples_the_batch_captions_at_the_batch_size_or_the_model_default(vc2_files, tiny_dataset,
                                                                                      tmp_path):
    from videotuna.utils.common_utils import instantiate_from_config

    config = _videotuna_yaml(vc2_files, tiny_dataset, tmp_path, "t2v_turbo")
    flow = instantiate_from_config(config.flow, resolve=True)
    flow.from_pretrained(config.train.ckpt, None, None)
    captions = ["a red ball", "a blue cube"]
    pixel_batch = {"caption": captions, "winner": torch.zeros(2, 3, 4, 32, 48)}
    logged = flow.log_images(pixel_batch, ddim_steps=2, unconditional_guidance_scale=7.5)
    assert logged["condition"] == captions
    samples = logged["samples"]
    assert samples.shape == (2, 3, 4, 32, 48)
    assert samples.min() >= -1 and samples.max() <= 1 and samples.std() > 0
    # The policy's own sampler with the same seed: log_images is the policy's samples mapped to [-1, 1].
    direct = flow.backend.generate(captions, num_frames=4, height=32, width=48, steps=2, guidance=7.5)
    assert torch.allclose(samples, direct.permute(0, 2, 1, 3, 4) * 2 - 1)
    latent_batch = {"caption": captions[:1], "winner_latents": torch.zeros(1, 4, 4, 4, 4)}
    default = flow.log_images(latent_batch, ddim_steps=2)["samples"]
    frames, (h, w) = flow.inner.temporal_length, flow.inner.image_size
    assert default.shape == (1, 3, frames, h * 8, w * 8)


def _image_logger(every):
    return {"image_logger": {"target": "videotuna.utils.callbacks.ImageLogger",
                             "params": {"batch_frequency": every, "max_images": 1,
                                        "log_images_kwargs": {"ddim_steps": 2, "unconditional_guidance_scale": 12.0}}}}


def test_dpo_flow_sets_logdir_so_the_image_logger_samples_and_exports_each_step_once(vc2_files, tiny_dataset,
                                                                                     tmp_path, monkeypatch):
    from videotuna_dpo.models.videocrafter import VideoCrafter2Backend

    saved = []
    original = VideoCrafter2Backend.save_trainable
    monkeypatch.setattr(VideoCrafter2Backend, "save_trainable",
                        lambda self, directory: saved.append(Path(directory).name) or original(self, directory))
    config = _videotuna_yaml(vc2_files, tiny_dataset, tmp_path)
    config.flow.params.export_every_n_steps = 2
    config.train.data.params.batch_size = 1
    config.train.lightning.trainer.update(max_steps=4, accumulate_grad_batches=2)
    config.train.lightning.callbacks = _image_logger(2)
    flow = _run_like_train_new(config)
    assert flow.logdir == str(tmp_path) and flow.trainer.global_step == 4
    # step-N once per optimizer step (not once per micro-batch), never the untrained step 0.
    assert saved == ["step-2", "step-4", "last"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "dpo_weights").iterdir()) == ["last", "step-2", "step-4"]
    images = sorted((tmp_path / "images" / "train").glob("*.pt"))
    assert len(images) == 4  # every second batch of 8 micro-batches (2 pairs, batch 1: batch_idx 1 of each epoch)
    logged = torch.load(images[0], weights_only=True)
    assert logged["samples"].shape == (1, 3, 4, 32, 32) and logged["samples"].std() > 0


def test_the_entrance_resumed_mid_epoch_trains_the_pairs_of_the_uninterrupted_run(vc2_files, tiny_dataset, tmp_path):
    """--resume_ckpt from a step inside an epoch: the data module continues that epoch where it stopped (it needs
    the host's Trainer for that), so the resumed run draws the same pairs and ends with the same weights."""
    import pytorch_lightning as pl

    class Seen(pl.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append((trainer.current_epoch, list(batch["pair_id"]), [int(s) for s in batch["frame_start"]]))

    def run(workdir, ckpt_path=None):
        config = _videotuna_yaml(vc2_files, tiny_dataset, workdir)
        config.train.data.params.update(batch_size=1, frame_start="random")
        config.train.lightning.trainer.enable_checkpointing = True
        seen = Seen()
        every_step = pl.callbacks.ModelCheckpoint(dirpath=workdir / "ckpt", filename="{step}", every_n_train_steps=1,
                                                  save_top_k=-1)
        torch.manual_seed(0)  # train_new.py's seed_everything
        return _run_like_train_new(config, [seen, every_step], ckpt_path), seen.batches

    whole, seen_whole = run(tmp_path / "whole")  # 3 steps; 2 pairs, batch 1: epoch 0 = steps 1-2, epoch 1 = step 3
    resumed, seen_resumed = run(tmp_path / "resumed", str(tmp_path / "whole" / "ckpt" / "step=1.ckpt"))  # in epoch 0
    assert resumed.trainer.global_step == 3 and len(seen_whole) == 3
    assert seen_resumed == seen_whole[1:], (seen_whole, seen_resumed)
    trained = [(a, b) for a, b in zip(whole.backend.trainable_parameters(), resumed.backend.trainable_parameters())]
    assert trained and all(torch.equal(a, b) for a, b in trained)


ENTRANCE_DDP_DRIVER = textwrap.dedent('''
    """scripts/train_new.py's sequence on the stand-in host (Lightning reruns this file as rank 1), each rank seeded
    differently (train_new.py seeds both alike; a script may not). Each rank writes ranks/rank<r>.json: its batches'
    pair ids and losses, its trainable tensors' bytes (hex) at the end, and the exported-weights folders it wrote."""
    import json
    import os
    import sys
    from pathlib import Path

    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf
    from videotuna.utils.common_utils import instantiate_from_config
    from videotuna_dpo.models.videocrafter import VideoCrafter2Backend

    torch.manual_seed(int(os.environ.get("LOCAL_RANK", "0")))  # Lightning sets LOCAL_RANK in the process it starts
    config = OmegaConf.load(sys.argv[1])
    record = {"batches": [], "exported": []}
    original = VideoCrafter2Backend.save_trainable
    VideoCrafter2Backend.save_trainable = lambda self, d: record["exported"].append(Path(d).name) or original(self, d)


    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            record["batches"].append({"step": trainer.global_step, "pairs": list(batch["pair_id"])})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            record["batches"][-1]["loss"] = float(outputs["loss"]) * trainer.accumulate_grad_batches

        def on_fit_end(self, trainer, pl_module):
            record["sampler"] = type(trainer.train_dataloader.sampler).__name__
            record["weights"] = [p.detach().cpu().float().numpy().tobytes().hex()
                                 for p in pl_module.backend.trainable_parameters()]
            out = Path(sys.argv[2]) / f"rank{trainer.global_rank}.json"
            out.write_text(json.dumps(record))


    flow = instantiate_from_config(config.flow, resolve=True)
    flow.from_pretrained(config.train.ckpt, None, None)
    flow.init_trainer(config.train)
    flow.trainer.callbacks.append(Record())
    flow.trainer.fit(flow, flow.data)
''')


def test_the_entrance_under_the_hosts_ddp_on_two_processes(vc2_files, tmp_path):
    """Issue #13: VideoTuna's default DDP (gloo on CPU) with 2 processes: each rank trains its own half of the pairs
    (even when the ranks were seeded differently), both start at log 2 and end with identical weights, and only
    rank 0 exports weights."""
    from tests.datasets import write_official_dataset

    dataset = write_official_dataset(tmp_path / "ds", [f"a square number {i}" for i in range(4)])
    config = _videotuna_yaml(vc2_files, dataset, tmp_path / "run")
    config.flow.params.export_every_n_steps = 1
    config.train.data.params.batch_size = 1
    config.train.lightning.trainer.update(devices=2, max_steps=2)  # 4 pairs / 2 ranks: one epoch of 2 steps
    OmegaConf.save(config, tmp_path / "config.yaml")
    (tmp_path / "ranks").mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(ENTRANCE_DDP_DRIVER)
    env = ddp_env(PYTHONPATH=os.pathsep.join([str(ROOT), str(STANDIN), os.environ.get("PYTHONPATH", "")]))
    proc = run_ddp([sys.executable, str(driver), str(tmp_path / "config.yaml"), str(tmp_path / "ranks")], env=env,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    shares = [[p for b in r["batches"] for p in b["pairs"]] for r in ranks]
    assert len(shares[0]) == len(shares[1]) == 2 and sorted(shares[0] + shares[1]) == sorted(
        f"{dataset.parent / 'part0'}#{i}" for i in range(4))  # each pair once, on one rank
    assert all(r["sampler"] == "EpochOrder" for r in ranks)  # ours, not Lightning's wrapper around it
    assert [r["batches"][0]["loss"] for r in ranks] == [pytest.approx(math.log(2), abs=1e-6)] * 2
    assert ranks[0]["weights"] and ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["exported"] == ["step-1", "step-2", "last"] and ranks[1]["exported"] == []
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "dpo_weights").iterdir()) == [
        "last", "step-1", "step-2"]


@pytest.mark.parametrize("name", ["vc2_dpo", "t2v_turbo_dpo"])
def test_shipped_videotuna_configs_run_as_they_are(vc2_files, tiny_dataset, tmp_path, name):
    """Only what a tiny CPU run must change is changed: the architecture, the files, sizes and devices."""
    cfg = OmegaConf.load(ROOT / "configs" / "videotuna" / f"{name}.yaml")
    cfg.flow.params.flow_config = vc2_files["section"]
    if name == "t2v_turbo_dpo":
        cfg.flow.params.model.update(lora_ckpt=str(vc2_files["lora"]), lora_rank=4)
    cfg.train.update(ckpt=str(vc2_files["ckpt"]), trained_ckpt=None, lorackpt=None, workdir=str(tmp_path),
                     ckptdir=str(tmp_path / "checkpoints"))
    cfg.train.data.params.update(train_data=str(tiny_dataset), video_length=4, resolution=[32, 32], num_workers=0)
    cfg.train.lightning.trainer.update(accelerator="cpu", max_steps=2, precision="32-true",
                                       enable_progress_bar=False, enable_model_summary=False)
    del cfg.train.lightning.callbacks.model_checkpoint  # VideoTuna's checkpoint callback: not in the stand-in
    cfg.train.lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps = 2
    torch.manual_seed(0)
    flow = _run_like_train_new(cfg)
    assert flow.trainer.global_step == 2
    assert flow._dpo.dpo.uncond_prob == 0.2 and flow._dpo.dpo.disable_dropout is True
    assert (tmp_path / "checkpoints" / "dpo_weights" / "last" / "trainable.json").is_file()


# -- Wan2.1 through VideoTuna's WanVideoModelFlow ------------------------------------------------------------------

def _wan_yaml(files, train_data, workdir):
    """A VideoTuna YAML shaped as wan_dpo.yaml on the tiny Wan; train.mapping takes the checkpoint folder to the flow."""
    section = OmegaConf.to_container(OmegaConf.create(files["section"]))
    section["params"]["ckpt_path"] = "set-by-train.mapping"
    section["params"]["denoiser_config"]["params"]["pretrained_model_name_or_path"] = \
        "${flow.params.flow_config.params.ckpt_path}"
    config = _videotuna_yaml({"section": section, "ckpt": files["ckpt"]}, train_data, workdir)
    config.flow.params.update(backend="wan", model={"lora": {"rank": 4, "alpha": 4}})
    config.train.mapping = {"train.ckpt": "flow.params.flow_config.params.ckpt_path"}
    config.train.data.params.video_length = 5  # Wan's 4n+1 frames
    return config


def test_a_videotuna_yaml_with_a_wan_flow_trains_dpo_from_log_2(wan_files, tiny_dataset, tmp_path, monkeypatch):
    from videotuna_dpo import videotuna_flow
    from videotuna_dpo.models.wan_videotuna import WanVideoTunaBackend

    losses = []
    original = videotuna_flow.log_step
    monkeypatch.setattr(videotuna_flow, "log_step", lambda module, out, used: losses.append(out.loss.item())
                        or original(module, out, used))
    config = _wan_yaml(wan_files, tiny_dataset, tmp_path)
    path = tmp_path / "wan_dpo.yaml"
    OmegaConf.save(config, path)
    torch.manual_seed(0)
    flow = _run_like_train_new(OmegaConf.load(path))
    assert isinstance(flow.backend, WanVideoTunaBackend) and flow.trainer.global_step == 3
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and len(losses) == 3  # policy == reference at step 0
    assert flow.inner.ckpt_path == str(wan_files["ckpt"])  # train.ckpt reached the flow through train.mapping
    trainable = flow.backend.trainable_parameters()
    assert trainable and all("lora_" in n for n, p in flow.named_parameters() if p.requires_grad)
    assert sum(p.requires_grad for p in flow.parameters()) == len(trainable)  # the host's trainable set undone
    assert flow.denoiser is flow.inner.denoiser is flow.inner.wan_t2v.model  # adapters in place: the host samples them
    weights = tmp_path / "checkpoints" / "dpo_weights" / "last"
    assert json.loads((weights / "trainable.json").read_text())["family"] == "wan_videotuna"
    again = flow.backend_class(OmegaConf.merge(flow.backend.cfg, {"flow": wan_files["section"],
                                                                  "trainable_weights": str(weights)}))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(again.trainable_parameters(), trainable))


def test_a_wan_flow_built_from_another_folder_than_train_ckpt_is_refused(wan_files, tiny_dataset, tmp_path):
    config = _wan_yaml(wan_files, tiny_dataset, tmp_path)
    del config.train.mapping
    config.flow.params.flow_config.params.ckpt_path = str(wan_files["ckpt"])
    config.train.ckpt = str(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="train.ckpt=.*elsewhere, but the WanVideoModelFlow was built from ckpt_path="):
        _run_like_train_new(config)


def test_shipped_wan_config_points_at_our_targets_with_vtuna_s_wan_settings():
    use_standin()
    from videotuna.utils.common_utils import get_obj_from_str

    from videotuna_dpo.models.wan_videotuna import WanVideoTunaSchema
    from videotuna_dpo.strategy import DPOSchema
    from videotuna_dpo.videotuna_flow import DPOFlow, PreferenceData

    cfg = OmegaConf.load(ROOT / "configs" / "videotuna" / "wan_dpo.yaml")
    assert get_obj_from_str(cfg.flow.target) is DPOFlow and get_obj_from_str(cfg.train.data.target) is PreferenceData
    flow = cfg.flow.params.flow_config
    assert flow.target == "videotuna.flow.wanvideo.WanVideoModelFlow" and flow.params.task == "t2v-1.3B"
    assert "lora_config" not in flow.params and cfg.flow.params.backend == "wan"
    # train.ckpt reaches the flow (and its WanModel.from_pretrained) as the host's own Wan YAMLs do it
    assert dict(cfg.train.mapping) == {"train.ckpt": "flow.params.flow_config.params.ckpt_path"}
    assert flow.params.denoiser_config.params.pretrained_model_name_or_path == cfg.train.ckpt
    model = validate({"name": "wan_videotuna", **cfg.flow.params.model}, WanVideoTunaSchema, "model")
    assert (model.finetune, model.lora.rank, model.lora.alpha, model.training_shift) == ("lora", 16, 16.0, 5.0)
    assert list(model.lora.target_modules) == ["q", "k", "v", "o", "ffn.0", "ffn.2"]
    dpo = validate(cfg.flow.params.dpo, DPOSchema, "dpo")
    assert (dpo.beta, dpo.beta_schedule, dpo.disable_dropout) == (5000, "eps_equivalent", True)
    data = cfg.train.data.params
    assert (data.video_length, data.frame_stride, list(data.resolution)) == (81, 1, [480, 832])
    assert "strategy" not in cfg.train.lightning  # the host's DDP, not the SFT YAMLs' DeepSpeed offload


def test_shipped_wan_config_runs_as_it_is(wan_files, tiny_dataset, tmp_path):
    """Only what a tiny CPU run must change is changed: the architecture, the files, sizes and devices."""
    cfg = OmegaConf.load(ROOT / "configs" / "videotuna" / "wan_dpo.yaml")
    tiny = OmegaConf.create(wan_files["section"]).params
    for key in ("first_stage_config", "cond_stage_config"):
        cfg.flow.params.flow_config.params[key] = tiny[key]
    cfg.train.update(ckpt=str(wan_files["ckpt"]), trained_ckpt=None, lorackpt=None, workdir=str(tmp_path),
                     ckptdir=str(tmp_path / "checkpoints"))
    cfg.train.data.params.update(train_data=str(tiny_dataset), video_length=5, resolution=[32, 32], num_workers=0)
    cfg.train.lightning.trainer.update(accelerator="cpu", max_steps=2, precision="32-true",
                                       enable_progress_bar=False, enable_model_summary=False)
    del cfg.train.lightning.callbacks.model_checkpoint  # VideoTuna's checkpoint callback: not in the stand-in
    cfg.train.lightning.callbacks.image_logger.params.update(batch_frequency=2)
    cfg.train.lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps = 2
    torch.manual_seed(0)
    flow = _run_like_train_new(cfg)
    assert flow.trainer.global_step == 2 and flow.inner.task == "t2v-1.3B"
    assert flow._dpo.dpo.beta_schedule == "eps_equivalent" and flow.backend.cfg.sample_shift == 8.0
    assert (tmp_path / "checkpoints" / "dpo_weights" / "last" / "trainable.json").is_file()
    logged = torch.load(next((tmp_path / "images" / "train").glob("*.pt")), weights_only=True)
    assert logged["samples"].shape == (1, 3, 5, 32, 32) and logged["samples"].std() > 0  # 4n+1 frames, sampled


def test_the_entrance_refuses_precompute_reference_by_name(vc2_files):
    from videotuna_dpo.videotuna_flow import DPOFlow

    with pytest.raises(UserError, match=r"flow.params.dpo.precompute_reference: the reference pre-pass runs in "
                                        r"`videotuna train` \(on a latent cache\)"):
        DPOFlow(vc2_files["section"], dpo={"precompute_reference": True})


def test_the_hosts_flow_checkpoint_folder_is_made_before_its_ranks_race_to_make_it(tmp_path):
    """VideoTuna's VideoTunaModelCheckpoint saves the whole flow on every rank into ``<dirpath>/flow``, making the
    folder when it finds it missing (exists-then-makedirs): two ranks raced there and one died with
    FileExistsError in 2 of 17 two-process runs of the real host. DPOFlow makes the folder at train start."""
    from types import SimpleNamespace

    from videotuna_dpo.videotuna_flow import make_host_checkpoint_dirs

    class VideoTunaModelCheckpoint:  # the host's names: save_flow, dirpath, _save_flow_checkpoint
        def __init__(self, dirpath, save_flow):
            self.dirpath, self.save_flow = str(dirpath), save_flow

        def _save_flow_checkpoint(self, trainer, pl_module, filepath):
            folder = os.path.join(os.path.dirname(filepath), "flow")
            if not os.path.exists(folder):
                os.makedirs(folder)

    flows = VideoTunaModelCheckpoint(tmp_path / "a" / "checkpoints", save_flow=True)
    trained_only = VideoTunaModelCheckpoint(tmp_path / "b" / "checkpoints", save_flow=False)
    trainer = SimpleNamespace(callbacks=[flows, trained_only, SimpleNamespace(dirpath=str(tmp_path / "c"))])
    make_host_checkpoint_dirs(trainer)
    make_host_checkpoint_dirs(trainer)  # every rank makes it: no error when it is there
    assert (tmp_path / "a" / "checkpoints" / "flow").is_dir()
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
