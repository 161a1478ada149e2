import os
from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import make_backend
from tests.videotuna_fixtures import pair_batch, vc2_files  # noqa: F401
from videotuna_dpo.data.datamodule import PreferenceDataModule
from videotuna_dpo.strategy import DPOModule, DPOSchema, OptimizerSchema


def _batch(tiny_dataset):
    dm = PreferenceDataModule.from_config(OmegaConf.create(
        {"train_data": str(tiny_dataset), "video_length": 9, "resolution": [32, 32], "batch_size": 2,
         "shuffle": False, "frame_start": "first"}))
    return next(iter(dm.train_dataloader()))


def _module(backend, **dpo):
    return DPOModule(backend, OmegaConf.structured(DPOSchema(**{"beta": 500.0, **dpo})),
                     OmegaConf.structured(OptimizerSchema(lr=1e-3, weight_decay=0.0)))


def _spy_add_noise(backend, calls):
    original = backend.add_noise

    def spy(x0, noise, t):
        calls.append((noise.clone(), t.clone()))
        return original(x0, noise, t)

    backend.add_noise = spy


@pytest.mark.parametrize("share", [True, False])
def test_winner_and_loser_share_noise_and_timestep(tiny_cogvideox, tiny_dataset, share):
    backend = make_backend(tiny_cogvideox)
    calls = []
    _spy_add_noise(backend, calls)
    torch.manual_seed(0)
    _, used = _module(backend, share_noise=share).dpo_step(_batch(tiny_dataset))
    (noise, t), = calls  # one forward-noising call for the whole batch of winners + losers
    assert noise.shape[0] == 4 and torch.equal(noise, used["noise"])
    noise_w, noise_l = noise.chunk(2)
    t_w, t_l = t.chunk(2)
    assert torch.equal(noise_w, noise_l) is share
    if share:
        assert torch.equal(t_w, t_l)
    else:
        assert not torch.equal(t_w, t_l) or not torch.equal(noise_w, noise_l)


def _train(module, batch, steps):
    optimizer = module.configure_optimizers()["optimizer"]
    for _ in range(steps):
        out, _ = module.dpo_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_only_trainable_parameters_change_and_reference_stays_frozen(tiny_cogvideox, tiny_dataset, finetune):
    backend = make_backend(tiny_cogvideox, finetune=finetune)
    module = _module(backend)
    batch = _batch(tiny_dataset)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    reference = backend.ref_denoiser
    torch.manual_seed(1)
    _train(module, batch, 2)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert len(changed) >= len(trainable) // 2
    frozen = [p for n, p in module.named_parameters() if n not in trainable]
    assert all(p.grad is None for p in frozen)
    if finetune == "full":
        assert all(torch.equal(p, before["backend.ref_denoisers.transformer." + n]) and p.grad is None
                   for n, p in reference.named_parameters())
    else:
        assert all("lora_" in n for n in trainable)


def test_overfitting_two_pairs_drives_implicit_accuracy_to_one(tiny_cogvideox, tiny_dataset):
    """Memorise two pairs under one fixed draw of noise and timesteps (a classic overfit check)."""
    backend = make_backend(tiny_cogvideox, lora={"rank": 8, "alpha": 8})
    module = _module(backend, beta=2000.0)
    batch = _batch(tiny_dataset)
    optimizer = module.configure_optimizers()["optimizer"]

    def step():
        torch.manual_seed(123)  # the same noise and timesteps every time
        return module.dpo_step(batch)[0]

    start = step()
    assert start.reward_margin.item() == pytest.approx(0.0, abs=1e-6), "policy == reference at the start"
    assert start.loss.item() == pytest.approx(0.6931, abs=1e-3), "-logsigmoid(0) = log 2"
    for _ in range(30):
        out = step()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    end = step()
    assert end.implicit_acc.item() == 1.0
    assert end.reward_margin.item() > 3.0
    assert end.loss.item() < 0.05


def test_caption_dropout_replaces_a_pairs_caption_for_winner_and_loser_together(tiny_cogvideox, tiny_dataset):
    from videotuna_dpo.errors import UserError

    backend = make_backend(tiny_cogvideox)
    batch = _batch(tiny_dataset)
    cond = backend.encode_prompt(list(batch["caption"]))
    null = backend.encode_prompt([""])[0]
    seen = []
    original = backend.predict
    backend.predict = lambda noisy, t, c: seen.append(c.clone()) or original(noisy, t, c)
    module = _module(backend, uncond_prob=0.5)
    torch.manual_seed(0)
    assert (torch.rand(2) < 0.5).tolist() == [True, False]  # seed 0 drops the first pair only
    torch.manual_seed(0)
    dropped = module._drop_captions(batch, cond)
    assert torch.allclose(dropped[0], null) and torch.equal(dropped[1], cond[1])
    for seed in range(4):
        torch.manual_seed(seed)
        module.dpo_step(batch)
        c2 = seen.pop()
        assert torch.equal(c2[:2], c2[2:])  # winners (first half) and losers (second half) share the caption
        assert all(torch.allclose(c2[i], null) or torch.equal(c2[i], cond[i]) for i in range(2))
    with pytest.raises(UserError, match=r"bad value for .dpo.uncond_prob.: 1.0 \(expected a probability in \[0, 1\)\)"):
        _module(backend, uncond_prob=1.0)


def test_every_dropout_layer_is_disabled_unless_asked_to_keep_it(tiny_cogvideox):
    backend = make_backend(tiny_cogvideox, lora={"rank": 4, "alpha": 4, "dropout": 0.1})
    dropouts = [m for m in backend.modules() if isinstance(m, torch.nn.Dropout)]
    assert any(m.p == 0.1 for m in dropouts)  # peft's lora_dropout
    _module(backend, disable_dropout=False)
    assert any(m.p == 0.1 for m in dropouts)
    _module(backend)
    assert all(m.p == 0.0 for m in dropouts)


class _NothingLoads:
    """A registry that fails the test if the run builds its datamodule or model."""

    def get(self, kind, name):
        raise AssertionError(f"the {kind} was built before --resume was checked")

    def names(self, kind):
        return []


def _spoil_checkpoint(path, how):
    torch.save({"state_dict": {"lora_A": torch.ones(64, 64)}, "global_step": 3}, path)
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "tensor_not_checkpoint":
        torch.save(torch.ones(3), path)


@pytest.mark.parametrize("how, message", [
    ("truncated", "not a loadable checkpoint, e.g. truncated by a copy or save cut short ("),
    ("tensor_not_checkpoint", "not a Lightning checkpoint (no 'state_dict')"),
])
def test_a_broken_resume_checkpoint_is_named_before_the_model_loads(tmp_path, how, message):
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.strategy import DPOStrategy

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    _spoil_checkpoint(ckpt, how)
    cfg = OmegaConf.create({"output_dir": str(run), "model": {"name": "cogvideox"}})
    with pytest.raises(UserError) as info:
        DPOStrategy.run(cfg, _NothingLoads(), resume="last")
    assert str(info.value).startswith(f"--resume {ckpt}: {message}")
    assert str(info.value).endswith(f"resume from another checkpoint (e.g. in {run / 'checkpoints'}) or start without --resume")


def test_a_resume_checkpoint_that_loads_as_tensors_passes_the_check(tmp_path):
    from videotuna_dpo.strategy import resume_checkpoint

    ckpt = tmp_path / "step-3.ckpt"
    _spoil_checkpoint(ckpt, "intact")
    assert resume_checkpoint(str(ckpt), tmp_path / "elsewhere") == ckpt
    assert resume_checkpoint(None, tmp_path) is None


class _Routed:
    def __init__(self, attrs):
        self.trained_attrs = attrs


@pytest.mark.parametrize("attrs,kwargs,expected", [
    (("transformer", "transformer_2"), {"strategy": "ddp", "devices": 8}, "ddp_find_unused_parameters_true"),
    (("transformer", "transformer_2"), {"devices": 2}, "ddp_find_unused_parameters_true"),
    (("transformer", "transformer_2"), {"devices": 1}, None),
    (("transformer",), {"strategy": "fsdp", "devices": 8}, "fsdp"),
    (("transformer",), {"strategy": "ddp", "devices": 8}, "ddp"),
])
def test_ddp_looks_for_unused_parameters_only_when_samples_are_routed_between_trained_experts(attrs, kwargs, expected):
    from videotuna_dpo.strategy import routed_ddp

    kwargs = dict(kwargs)
    routed_ddp(_Routed(attrs), kwargs)
    assert kwargs.get("strategy") == expected


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3", "deepspeed_stage_2_offload"])
def test_sharded_strategies_refuse_to_route_between_two_trained_experts(strategy):
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.strategy import routed_ddp

    with pytest.raises(UserError, match=f"strategy={strategy}: .*model.train_experts=high, then low"):
        routed_ddp(_Routed(("transformer", "transformer_2")), {"strategy": strategy, "devices": 8})


def test_the_global_batch_beta_and_lr_are_logged_once_at_the_start(tiny_cogvideox, tiny_dataset, tmp_path, capsys):
    import yaml

    from tests.conftest import ROOT
    from videotuna_dpo.registry import Registry
    from videotuna_dpo.strategy import DPOStrategy

    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"), {
        "output_dir": str(tmp_path / "run"), "model": {"pretrained": str(tiny_cogvideox)},
        "data": {"train_data": str(tiny_dataset), "batch_size": 1}, "optimizer": {"lr": 2e-4, "warmup_steps": 5},
        "lightning": {"trainer": {"max_steps": 1, "accumulate_grad_batches": 2, "enable_progress_bar": False},
                      "checkpoint": {"every_n_train_steps": 0, "export_weights": False}}})
    DPOStrategy.run(cfg, Registry.load(["dpo"]))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("DPO training:")]
    assert lines == [
        "DPO training: global batch 2 pairs (1 per device x 1 device(s) x 2 accumulation); beta 500 on the per-sample "
        "error as the backend predicts it (noise, v or velocity) (loss sigmoid of -beta/2 x [(policy - reference error) "
        "of the winner - of the loser]); lr 0.0002 per optimizer step on the mean over the global batch, not scaled by "
        "it, reached after a linear warmup of 5 steps"]
    hparams = yaml.safe_load((tmp_path / "run" / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams == {"run/pairs_per_device": 1, "run/devices": 1, "run/accumulate_grad_batches": 2,
                       "run/global_batch_pairs": 2, "run/beta": 500.0, "run/beta_schedule": "constant",
                       "run/loss_type": "sigmoid", "run/lr": 2e-4, "run/warmup_steps": 5}


def test_adamw_8bit_trains_with_bitsandbytes_adamw8bit_and_its_settings(tiny_cogvideox, tiny_dataset, monkeypatch):
    """bitsandbytes needs a CUDA GPU; a stand-in package with its ``optim.AdamW8bit`` checks what we hand it."""
    import sys
    import types

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            self.kwargs = kwargs
            super().__init__(params, **kwargs)

    backend = make_backend(tiny_cogvideox)  # before the stand-in: peft looks for bitsandbytes' layers when it exists
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(AdamW8bit=AdamW8bit)))
    module = DPOModule(backend, OmegaConf.structured(DPOSchema(beta=500.0)),
                       OmegaConf.structured(OptimizerSchema(name="adamw_8bit", lr=2e-4, weight_decay=0.01, eps=1e-6)))
    optimizer = module.configure_optimizers()["optimizer"]
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    assert type(optimizer) is AdamW8bit
    assert optimizer.kwargs == {"lr": 2e-4, "betas": (0.9, 0.999), "weight_decay": 0.01, "eps": 1e-6}
    assert [p for group in optimizer.param_groups for p in group["params"]] == backend.trainable_parameters()
    before = [p.detach().clone() for p in backend.trainable_parameters()]
    torch.manual_seed(0)
    out, _ = module.dpo_step(_batch(tiny_dataset))
    out.loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, backend.trainable_parameters()))


@pytest.mark.parametrize("model", ["cogvideox_full", "cogvideox_lora", "videocrafter2_full"])
def test_bf16_mixed_with_the_reference_in_bf16_starts_with_policy_equal_to_reference(
        model, tiny_cogvideox, tiny_dataset, vc2_files, pair_batch):
    """Lightning's bf16-mixed precision plugin; the reference a bf16 copy (full) or the bf16 base (LoRA): step 0 is log 2.
    VC2's bf16 copy keeps the host's GroupNorms in fp32 (CPU autocast does not cast their weights; the stand-in
    normalises x.float() as the host's lvdm GroupNormSpecific does)."""
    import math

    import lightning as L

    from tests.videotuna_fixtures import make_vc2

    if model == "videocrafter2_full":
        backend = make_vc2(vc2_files, reference_dtype="bf16")
        reference_net, batch = backend.ref_denoiser, pair_batch
    else:
        finetune = model.split("_")[1]
        backend = make_backend(tiny_cogvideox, finetune=finetune, weight_dtype="bf16")
        reference_net, batch = backend.ref_denoiser or backend.transformer, _batch(tiny_dataset)
    norms = {n for n, m in reference_net.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    if model == "videocrafter2_full":  # the host's GroupNorm normalises x.float(): on CPU its weights must be fp32
        assert norms and {p.dtype for n, p in reference_net.named_parameters() if n.rsplit(".", 1)[0] in norms} \
            == {torch.float32}
    else:
        norms = set()
    assert {p.dtype for n, p in reference_net.named_parameters()
            if "lora_" not in n and n.rsplit(".", 1)[0] not in norms} == {torch.bfloat16}
    assert {p.dtype for p in backend.trainable_parameters()} == {torch.float32}
    module = _module(backend, beta=5000.0)  # the paper's beta: a bf16 mismatch of 1e-3 in the errors would show
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    logged = trainer.callback_metrics
    assert logged["train/model_err_w"].item() == pytest.approx(logged["train/ref_err_w"].item(), rel=2 ** -8)
    assert logged["train/model_err_l"].item() == pytest.approx(logged["train/ref_err_l"].item(), rel=2 ** -8)
    assert logged["train/loss"].item() == pytest.approx(math.log(2), abs=1e-3)
    assert logged["train/reward_margin"].abs().item() < 2e-3


@pytest.mark.parametrize("trainer,expected", [
    ({"strategy": "fsdp", "accelerator": "cpu", "devices": 2},
     r"^c.yaml: lightning.trainer \(accelerator=cpu, devices=2, precision=32-true, strategy=fsdp\) cannot run here: "
     r"The strategy `fsdp` requires a GPU accelerator"),
    ({"strategy": "deepspeed_stage_3", "accelerator": "cpu", "devices": 1},
     r"cannot run here: .*DeepSpeed.*pip install -U deepspeed"),
    ({"accelerator": "gpu", "devices": 8},
     r"^c.yaml: lightning.trainer \(accelerator=gpu, devices=8, precision=32-true\) cannot run here: No supported gpu"),
])
def test_an_engine_the_machine_cannot_run_is_refused_before_the_model_loads(tmp_path, trainer, expected, monkeypatch):
    from tests.conftest import ROOT
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.registry import Registry
    from videotuna_dpo.strategy import DPOStrategy

    monkeypatch.setattr(DPOStrategy, "build", lambda *a, **k: pytest.fail("the model was built before the check"))
    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"), {
        "output_dir": str(tmp_path / "run"), "lightning": {"trainer": trainer},
        "model": {"pretrained": str(tmp_path / "not-loaded")}, "data": {"train_data": str(tmp_path / "not-read.yaml")}})
    with pytest.raises(UserError, match=expected):
        DPOStrategy.run(cfg, Registry.load(["dpo"]), source="c.yaml")
    assert not (tmp_path / "run").exists()


# Rank 0 of a 2-task srun job on one node.
SRUN = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_JOB_NAME": "train", "SLURM_NODELIST": "localhost"}


@pytest.mark.parametrize("env,started_with,trainer,refused", [
    # started with what Lightning leaves in a process after a DDP run: inherited from the script that started it
    ({"LOCAL_RANK": "0"}, "same", {"devices": 2}, True),
    ({"LOCAL_RANK": "0"}, "same", {"devices": 1, "num_nodes": 2}, True),
    ({"LOCAL_RANK": "0"}, "same", {"devices": 1}, False),  # one process: Lightning starts no other rank
    # set in this process by Lightning's launcher: the second training of a script, its ranks running it again
    ({"LOCAL_RANK": "0"}, {}, {"devices": 2}, False),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "same", {"devices": 2}, False),  # a rank torchrun or Lightning started
    ({"LOCAL_RANK": "0", **SRUN}, "same", {"devices": 2}, False),  # under srun Lightning reads SLURM's variables
    ({}, "same", {"devices": 2}, False),
])
def test_a_multi_process_run_from_a_stale_local_rank_is_refused_not_left_waiting(env, started_with, trainer, refused,
                                                                                 monkeypatch):
    from videotuna_dpo import jobs
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.jobs import Launch
    from videotuna_dpo.strategy import check_engine

    for name in [n for n in os.environ if n in ("LOCAL_RANK", "WORLD_SIZE") or n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started_with = env if started_with == "same" else started_with
    monkeypatch.setattr(jobs, "_STARTED_WITH", {n: started_with.get(n) for n in ("LOCAL_RANK", "WORLD_SIZE")})
    model, dpo = OmegaConf.create({"finetune": "lora"}), OmegaConf.create({})
    checks = [lambda: check_engine({"strategy": "ddp", "accelerator": "cpu", **trainer}, model, dpo, "c.yaml"),
              lambda: Launch(devices=trainer["devices"], num_nodes=trainer.get("num_nodes", 1)).resolved()]
    processes = trainer["devices"] * trainer.get("num_nodes", 1)
    settings = f"strategy=ddp, accelerator=cpu, devices={trainer['devices']}" + (
        f", num_nodes={trainer['num_nodes']}" if "num_nodes" in trainer else "")
    for check, what in zip(checks, [f"c.yaml: lightning.trainer ({settings})",
                                    f"--devices {trainer['devices']} --num-nodes {trainer.get('num_nodes', 1)}"]):
        if not refused:
            check()
            continue
        with pytest.raises(UserError) as err:
            check()
        assert str(err.value).startswith(
            f"{what}: {processes} processes, but this process's environment has LOCAL_RANK=0 without WORLD_SIZE: "
            f"Lightning would take it for one rank of a job a launcher started and wait for the other ranks")
        assert str(err.value).endswith("Unset LOCAL_RANK (and NODE_RANK, MASTER_PORT) for this command, or start it "
                                       "with torchrun")


def test_a_ddp_run_started_after_an_in_process_ddp_run_says_why_instead_of_hanging(tiny_cogvideox, tiny_dataset,
                                                                                   tmp_path):
    """The user's case: a script trains through the VideoTuna host (DDP, one device) in its own process, whose
    Lightning leaves LOCAL_RANK=0 and NODE_RANK=0 in os.environ, then starts `videotuna train` on 2 processes.
    Lightning would take that command for rank 0 of an outside launch and wait 30 minutes for a rank 1."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "LOCAL_RANK": "0", "NODE_RANK": "0", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "videotuna_dpo", "train", "--strategy", "dpo", "--config",
         str(ROOT / "configs" / "dpo" / "cogvideox_tiny.yaml"), f"model.pretrained={tiny_cogvideox}",
         f"data.train_data={tiny_dataset}", f"output_dir={tmp_path / 'run'}", "lightning.trainer.devices=2",
         "lightning.trainer.strategy=ddp"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "2 processes, but this process's environment has LOCAL_RANK=0 without WORLD_SIZE" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precompute,refused", [(False, True), (True, False)])
def test_a_sharded_strategy_refuses_a_cpu_reference_copy_it_would_replicate(precompute, refused):
    from videotuna_dpo.errors import UserError
    from videotuna_dpo.strategy import check_engine

    model = OmegaConf.create({"finetune": "full", "reference_on_cpu": True})
    dpo = OmegaConf.create({"precompute_reference": precompute})
    # On this CPU-only machine the engine itself is refused next; what is asserted is which refusal comes.
    with pytest.raises(UserError) as err:
        check_engine({"strategy": "deepspeed_stage_3", "accelerator": "cpu"}, model, dpo, "c.yaml")
    message = str(err.value)
    assert message.startswith("c.yaml: lightning.trainer.strategy=deepspeed_stage_3 with model.reference_on_cpu=true: "
                              "the frozen reference copy would be moved whole onto every GPU") == refused
    assert ("dpo.precompute_reference=true" in message) == refused
    check_engine({"strategy": "ddp", "accelerator": "cpu", "devices": 2}, model, dpo, "c.yaml")  # DDP replicates anyway


@pytest.mark.parametrize("strategy,offload", [("fsdp", False), ("fsdp_cpu_offload", True)])
def test_fsdp_shards_the_denoiser_block_by_block_as_it_names_its_blocks(tiny_cogvideox, strategy, offload, capsys):
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from lightning.pytorch.strategies import FSDPStrategy

    from videotuna_dpo.strategy import wrap_blocks

    kwargs = {"strategy": strategy, "devices": 4}
    wrap_blocks(make_backend(tiny_cogvideox, finetune="full"), kwargs)
    chosen = kwargs["strategy"]
    assert isinstance(chosen, FSDPStrategy) and kwargs["devices"] == 4
    # CogVideoXTransformer3DModel._no_split_modules names CogVideoXBlock and CogVideoXPatchEmbed.
    assert chosen.kwargs["auto_wrap_policy"]._module_classes == {CogVideoXBlock,
                                                                 type(make_backend(tiny_cogvideox).transformer.patch_embed)}
    assert (chosen.cpu_offload is not None and chosen.cpu_offload.offload_params) == offload
    assert capsys.readouterr().out.startswith(f"lightning.trainer.strategy={strategy}: FSDP shards each of "
                                              "CogVideoXBlock, CogVideoXPatchEmbed")
    other = {"strategy": "ddp"}
    wrap_blocks(make_backend(tiny_cogvideox), other)
    assert other == {"strategy": "ddp"}


@pytest.mark.parametrize("setup", ["lora", "full", "full_reference_on_cpu", "precomputed_full", "precomputed_lora"])
def test_a_dpo_step_runs_the_denoiser_twice_with_a_live_reference_and_once_with_stored_errors(tiny_cogvideox, setup):
    """DPO = SFT + one reference forward, no more: the policy pass and the reference pass each see winners and
    losers together; with ``dpo.precompute_reference`` only the policy runs. Counted over every CogVideoX
    transformer in the process (a full fine-tune's frozen copy is a second instance, on the device or on the CPU)."""
    from diffusers import CogVideoXTransformer3DModel

    from videotuna_dpo.models.finetune import without_reference_copy

    finetune = "lora" if setup.endswith("lora") else "full"
    precomputed = setup.startswith("precomputed")
    with without_reference_copy() if precomputed else nullcontext():
        backend = make_backend(tiny_cogvideox, finetune=finetune, load_text_and_vae=False,
                               reference_on_cpu=setup == "full_reference_on_cpu")
    module = _module(backend, precompute_reference=precomputed)
    g = torch.Generator().manual_seed(0)
    batch = {"winner_latents": torch.randn(2, 3, 4, 8, 8, generator=g), "loser_latents": torch.randn(2, 3, 4, 8, 8, generator=g),
             "prompt_embeds": torch.randn(2, 16, 32, generator=g), "caption": ["a", "b"]}
    if precomputed:
        batch.update(ref_err_w=torch.tensor([0.5, 0.25]), ref_err_l=torch.tensor([0.75, 1.0]))
    calls = []

    def count(mod, args, kwargs, output):
        if isinstance(mod, CogVideoXTransformer3DModel):
            calls.append((id(mod), kwargs["hidden_states"].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(count, with_kwargs=True)
    try:
        out, used = module.dpo_step(batch)
        out.loss.backward()
    finally:
        handle.remove()
    policy = id(backend.transformer)
    if precomputed:
        assert calls == [(policy, 4)]  # winners and losers in one policy pass, nothing else
        assert used["ref_err_w"].tolist() == [0.5, 0.25] and used["ref_err_l"].tolist() == [0.75, 1.0]
    elif finetune == "lora":
        assert calls == [(policy, 4), (policy, 4)]  # the reference is the same network, adapters off
    else:
        reference = backend.ref_denoiser if setup == "full" else backend._ref_cpu["transformer"]
        assert calls == [(policy, 4), (id(reference), 4)]
