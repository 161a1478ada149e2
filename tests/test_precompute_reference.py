"""dpo.precompute_reference: the reference's errors stored once per draw, training without the reference model."""

import csv
import json
import math
import os
import shutil
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from tests.conftest import ROOT, ddp_env, make_backend, run_ddp
from videotuna_dpo.data.datamodule import PreferenceDataModule
from videotuna_dpo.data.latent_cache import build_cache
from videotuna_dpo.data.reference_draws import ReferenceDraws, pair_key, reference_dir, reference_settings
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.cogvideox import CogVideoXBackend
from videotuna_dpo.registry import Registry
from videotuna_dpo.strategy import DPOModule, DPOStrategy, precompute_reference, reference_store

CONFIG = ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"
DRAWS = 2


@pytest.fixture(scope="module")
def latent_cache(tiny_cogvideox, tiny_dataset, tmp_path_factory):
    cfg = OmegaConf.load(CONFIG)
    cfg.model.pretrained = str(tiny_cogvideox)
    out = tmp_path_factory.mktemp("precompute") / "cache"
    build_cache(cfg.model, cfg.data, make_backend(tiny_cogvideox), tiny_dataset, out)
    return out


def _config(tiny_cogvideox, tiny_dataset, cache, out, finetune="full", **dpo):
    """The tiny CogVideoX run on a copy of the latent cache (its own reference draws), 1 pair a step, 2 epochs."""
    if not cache.is_dir():
        raise AssertionError(cache)
    cfg = OmegaConf.load(CONFIG)
    return OmegaConf.merge(cfg, {
        "output_dir": str(out), "model": {"pretrained": str(tiny_cogvideox), "finetune": finetune},
        "data": {"train_data": str(tiny_dataset), "cache": str(cache), "batch_size": 1},
        "dpo": {"precompute_reference": True, "reference_draws": DRAWS, **dpo},
        "lightning": {"trainer": {"max_steps": 4, "enable_progress_bar": False},
                      "checkpoint": {"every_n_train_steps": 0, "export_weights": False}}})


def _own_cache(latent_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(latent_cache, copy, ignore=shutil.ignore_patterns("reference"))
    return copy


def _logged(out):
    rows = list(csv.DictReader(open(out / "logs" / "version_0" / "metrics.csv")))
    return {int(r["step"]): r for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_training_on_precomputed_reference_gives_the_live_reference_s_losses_step_by_step_without_building_it(
        tiny_cogvideox, tiny_dataset, latent_cache, tmp_path, monkeypatch, finetune):
    cache = _own_cache(latent_cache, tmp_path)
    cfg = _config(tiny_cogvideox, tiny_dataset, cache, tmp_path / "run", finetune)
    built, phase, reference_calls = {}, ["train"], []
    real_build, real_reference, real_predict_step = DPOStrategy.build.__func__, CogVideoXBackend.reference, \
        DPOModule.predict_step

    def build(cls, *args, **kwargs):
        top, module, datamodule = real_build(cls, *args, **kwargs)
        built.update(top=top, module=module, start={n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
        return top, module, datamodule

    def reference(self):
        reference_calls.append(phase[0])
        return real_reference(self)

    def predict_step(self, *args):
        phase[0] = "pre-pass"
        try:
            return real_predict_step(self, *args)
        finally:
            phase[0] = "train"

    monkeypatch.setattr(DPOStrategy, "build", classmethod(build))
    monkeypatch.setattr(CogVideoXBackend, "reference", reference)
    monkeypatch.setattr(DPOModule, "predict_step", predict_step)
    DPOStrategy.run(cfg, Registry.load(["dpo"]))
    monkeypatch.undo()

    # The reference model was never built (full) and never run while training (LoRA: adapters off in the pre-pass only).
    backend = built["module"].backend
    if finetune == "full":
        assert backend.reference_copy_skipped and not backend.ref_denoisers and not backend._ref_cpu
        assert reference_calls == []  # the pre-pass ran the policy before its first step
        with pytest.raises(UserError, match="built without its frozen reference copy"), backend.reference():
            pass
        assert sum(p.numel() for p in backend.parameters()) == sum(p.numel() for p in backend.transformer.parameters())
    else:
        assert reference_calls and set(reference_calls) == {"pre-pass"}
    logged = _logged(tmp_path / "run")
    assert sorted(logged) == [0, 1, 2, 3]
    assert float(logged[0]["train/loss"]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0

    # The same steps with a live reference (a frozen copy / adapters off) on the same stored draws.
    top = built["top"]
    live = make_backend(tiny_cogvideox, finetune=finetune, lora={"rank": 8, "alpha": 8}, load_text_and_vae=False)
    module = DPOModule(live, OmegaConf.merge(top.dpo, {"precompute_reference": False}), top.optimizer)
    module.load_state_dict(built["start"], strict=False)
    if finetune == "full":
        assert live.ref_denoiser is not None
    dm = PreferenceDataModule.from_config(cfg.data)
    dm.seed = cfg.seed
    dm.setup("fit")
    keys = [pair_key(p) for p in dm.dataset.pairs]
    store = ReferenceDraws(reference_dir(cache), reference_settings(backend.cfg, top.dpo, top.seed))
    dm.dataset.attach_draws(store.load(keys))
    loader = dm.train_dataloader()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    step = 0
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            assert int(batch["draw_index"]) == epoch % DRAWS  # each epoch the pair's next draw
            out, used = module.dpo_step(batch)
            assert used["ref_err_w"] == pytest.approx(batch["ref_err_w"], rel=1e-5, abs=1e-7)
            assert used["ref_err_l"] == pytest.approx(batch["ref_err_l"], rel=1e-5, abs=1e-7)
            assert out.loss.item() == pytest.approx(float(logged[step]["train/loss"]), rel=1e-4, abs=1e-6), step
            assert used["ref_err_w"].mean().item() == pytest.approx(float(logged[step]["train/ref_err_w"]), rel=1e-5)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    assert step == 4
    assert len({float(r["train/loss"]) for r in logged.values()}) == 4  # the steps differ: the check has teeth


def _build(cfg):
    return DPOStrategy.build(cfg, Registry.load(["dpo"]))


def _pre_pass(cfg, pairs_per_shard=64):
    top, module, datamodule = _build(cfg)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    store = reference_store(datamodule, module.backend.cfg, top)
    precompute_reference(trainer, module, datamodule, store, top.seed, pairs_per_shard=pairs_per_shard)
    return store, datamodule.dataset


def test_an_interrupted_pre_pass_resumes_to_the_uninterrupted_draws(tiny_cogvideox, tiny_dataset, latent_cache,
                                                                    tmp_path, monkeypatch):
    from videotuna_dpo.data import reference_draws

    whole_cfg = _config(tiny_cogvideox, tiny_dataset, _own_cache(latent_cache, tmp_path / "a"), tmp_path / "r")
    whole, whole_data = _pre_pass(whole_cfg, pairs_per_shard=1)
    cfg = _config(tiny_cogvideox, tiny_dataset, _own_cache(latent_cache, tmp_path / "b"), tmp_path / "r")
    real_save, saves = reference_draws.save_file, []

    def dies_on_the_second_shard(tensors, path, metadata=None):
        saves.append(path)
        if len(saves) == 2:
            raise RuntimeError("killed")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(reference_draws, "save_file", dies_on_the_second_shard)
    with pytest.raises(RuntimeError, match="killed"):
        _pre_pass(cfg, pairs_per_shard=1)
    monkeypatch.undo()
    directory = reference_dir(cfg.data.cache)
    assert sorted(p.name for p in directory.iterdir()) == ["draws-r0-00000.safetensors", "index.json"]
    assert json.loads((directory / "index.json").read_text())["pairs"] == {}  # settings first, pairs at the end

    store, data = _pre_pass(cfg, pairs_per_shard=1)
    assert sorted(p.name for p in directory.iterdir()) == [
        "draws-r0-00000.safetensors", "draws-r0-00001.safetensors", "index.json"]
    with safe_open(str(directory / "draws-r0-00001.safetensors"), framework="pt") as handle:
        assert len(json.loads(handle.metadata()["pairs"])) == 1  # only the pair the killed pass had not stored
    assert len(data.pairs) == 2
    for field in ("seed", "t", "drop"):
        assert torch.equal(data.draws[field], whole_data.draws[field]), field
    assert torch.allclose(data.draws["ref_err"], whole_data.draws["ref_err"], rtol=1e-6, atol=1e-8)
    assert data.draws["seed"].shape == (2, DRAWS) and data.draws["t"].shape == (2, DRAWS, 2)
    assert len(set(data.draws["seed"].flatten().tolist())) == 2 * DRAWS
    assert torch.equal(data.draws["t"][..., 0], data.draws["t"][..., 1])  # winner and loser share the timestep


def test_draws_of_other_settings_are_refused_by_name_before_the_model_loads(tiny_cogvideox, tiny_dataset, latent_cache,
                                                                            tmp_path):
    cache = _own_cache(latent_cache, tmp_path)
    _pre_pass(_config(tiny_cogvideox, tiny_dataset, cache, tmp_path / "r"))

    class NoModel:
        registry = Registry.load(["dpo"])

        def get(self, kind, name):
            found = self.registry.get(kind, name)
            if kind != "model":
                return found

            class Unloadable(found):
                @classmethod
                def from_config(cls, *args, **kwargs):
                    raise AssertionError("the model loaded before the draws were checked")

            return Unloadable

    for override, message in ((dict(uncond_prob=0.5), "dpo.uncond_prob: draws have 0.0, config has 0.5"),
                              (dict(reference_draws=3), "dpo.reference_draws: draws have 2, config has 3")):
        cfg = _config(tiny_cogvideox, tiny_dataset, cache, tmp_path / "r", **override)
        with pytest.raises(UserError, match=f"were computed with other settings \\({message}\\)"):
            DPOStrategy.build(cfg, NoModel())
    cfg = OmegaConf.merge(_config(tiny_cogvideox, tiny_dataset, cache, tmp_path / "r"), {"model": {"weight_dtype": "bf16"}})
    with pytest.raises(UserError, match="model.weight_dtype: draws have 'fp32', config has 'bf16'"):
        DPOStrategy.build(cfg, NoModel())
    # A default written out, or a key that leaves the reference's prediction alone, changes nothing.
    same = OmegaConf.merge(_config(tiny_cogvideox, tiny_dataset, cache, tmp_path / "r"),
                           {"model": {"reference_on_cpu": False, "gradient_checkpointing": True, "lora": {"rank": 2}},
                            "dpo": {"share_noise": True, "beta": 100.0}})
    DPOStrategy.build(same, Registry.load(["dpo"]))


def test_precompute_reference_needs_a_latent_cache_and_a_reference_it_can_compute(tiny_cogvideox, tiny_dataset,
                                                                                  latent_cache, tmp_path):
    cfg = _config(tiny_cogvideox, tiny_dataset, latent_cache, tmp_path / "r")
    with pytest.raises(UserError, match="set data.cache"):
        _build(OmegaConf.merge(cfg, {"data": {"cache": None}}))
    with pytest.raises(UserError, match="model.trainable_weights makes that policy another model; start from those "
                                        "weights with model.init_weights"):
        _build(OmegaConf.merge(cfg, {"model": {"trainable_weights": str(tmp_path / "w")}}))


def test_the_pre_pass_shards_pairs_across_two_ddp_ranks(tiny_cogvideox, tiny_dataset, latent_cache, tmp_path):
    cache = _own_cache(latent_cache, tmp_path)
    env = ddp_env(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = run_ddp(
        [sys.executable, "-m", "videotuna_dpo", "train", "--strategy", "dpo", "--config", str(CONFIG),
         f"model.pretrained={tiny_cogvideox}", "model.finetune=full", f"data.train_data={tiny_dataset}",
         f"data.cache={cache}", "data.batch_size=1", f"output_dir={tmp_path / 'run'}", "dpo.precompute_reference=true",
         f"dpo.reference_draws={DRAWS}", "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
         "lightning.trainer.max_steps=2", "lightning.checkpoint.every_n_train_steps=0"],
        env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # Logged once, by rank 0: the global batch counts both ranks.
    assert [line for line in proc.stdout.splitlines() if line.startswith("DPO training: ")] == [
        "DPO training: global batch 2 pairs (1 per device x 2 device(s) x 1 accumulation); beta 500 on the per-sample "
        "error as the backend predicts it (noise, v or velocity) (loss sigmoid of -beta/2 x [(policy - reference error) "
        "of the winner - of the loser]); lr 0.001 per optimizer step on the mean over the global batch, not scaled by it"]
    directory = reference_dir(cache)
    shards = sorted(p.name for p in directory.glob("draws-*"))
    assert shards == ["draws-r0-00000.safetensors", "draws-r1-00000.safetensors"]  # one pair each, each rank its own
    held = []
    for name in shards:
        with safe_open(str(directory / name), framework="pt") as handle:
            held += json.loads(handle.metadata()["pairs"])
    index = json.loads((directory / "index.json").read_text())
    assert sorted(held) == sorted(index["pairs"]) and len(held) == 2
    assert {e["shard"] for e in index["pairs"].values()} == set(shards)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["global_step"] == 2
