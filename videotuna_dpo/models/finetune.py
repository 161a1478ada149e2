"""LoRA or full fine-tuning of a backend's denoiser, and the reference model each implies: one place for every backend.

LoRA (peft, through diffusers' ``add_adapter`` or peft's ``inject_adapter_in_model`` on a plain module): the
reference is the same network with its adapters disabled, so no second copy of the weights exists. Full: the
reference is a frozen copy, optionally kept on the CPU (outside the module, so ``.to(device)`` never moves it) and
moved in per step. The reference always runs in eval mode (no dropout). Trainable weights are saved as safetensors:
``pytorch_lora_weights.safetensors`` (diffusers' LoRA format, keys prefixed with the denoiser's name), and for a full
fine-tune the denoiser's ``save_pretrained`` folder (a diffusers model) or ``<name>.safetensors`` (a plain module's
state dict, e.g. VideoTuna's VC2 UNet).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import (PredictFn, atomic_directory, init_weights_id, load_state_strict,
                                      named_load_errors, read_safetensors, read_trainable_meta)

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_MODEL_PREFIX = "base_model.model."  # what get_peft_model_state_dict puts before the keys of a PeftModel wrapper
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers' (and VC2's) attention layer names
_REFERENCE_COPY = ContextVar("videotuna_reference_copy", default=True)


def dtype_setting(key: str, value: str) -> torch.dtype:
    """The torch dtype a config's ``fp32 | bf16 | fp16`` names; anything else is an error naming ``key``."""
    if value not in DTYPES:
        raise UserError(f"{key} must be one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


def check_finetune(value: str) -> None:
    """``model.finetune`` is ``lora`` or ``full``; say so before any weights load."""
    if value not in ("lora", "full"):
        raise UserError(f"model.finetune must be 'lora' or 'full', got {value!r}")


@dataclass
class LoraSchema:
    """``model.lora``: the adapters added to each trained denoiser (peft ``LoraConfig``)."""

    rank: int = 128
    alpha: float = 128.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


def lora_field(rank: int, target_modules: list[str], alpha: float | None = None) -> Any:
    """A schema's ``lora:`` field with a family's defaults (alpha = rank unless given)."""
    return field(default_factory=lambda: LoraSchema(rank=rank, alpha=float(rank if alpha is None else alpha),
                                                    target_modules=list(target_modules)))


@contextmanager
def without_reference_copy() -> Iterator[None]:
    """Backends built inside make no frozen reference copy for a full fine-tune (``dpo.precompute_reference``:
    the reference's errors come from a pre-pass, run by the policy before its first step, when it is the reference)."""
    token = _REFERENCE_COPY.set(False)
    try:
        yield
    finally:
        _REFERENCE_COPY.reset(token)


def reference_copy_wanted() -> bool:
    """False inside :func:`without_reference_copy`."""
    return _REFERENCE_COPY.get()


NO_REFERENCE_COPY = ("was built without its frozen reference copy (dpo.precompute_reference): the reference's errors "
                     "come from the stored pre-pass, not from a live reference")


def merge_lora(net: nn.Module, state: dict[str, torch.Tensor], lora: dict[str, Any], what: str) -> None:
    """Fold a LoRA (a peft state dict and its rank/alpha/targets) into ``net``'s own weights, in place.

    peft injects and loads it as adapter ``init`` and ``merge_and_unload`` folds it away, leaving ``net``
    adapter-free: a DPO adapter added next trains over it, and disabling that adapter gives ``net``.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0,
                        target_modules=list(lora["target_modules"]))
    model = get_peft_model(net, config, adapter_name="init")
    prefix = PEFT_MODEL_PREFIX
    state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name="init")
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    loaded = [k for k in state if "lora_" in k]
    if unexpected or not loaded:
        raise UserError(f"{what}: its LoRA does not fit this model (unexpected keys {unexpected[:3]}, "
                        f"{len(loaded)} LoRA tensors); give the weights of a run on the same base model")
    model.merge_and_unload()
    net.__dict__.pop("peft_config", None)  # peft leaves its config on the unwrapped module


def add_lora(net: nn.Module, config: Any) -> None:
    """Inject LoRA adapter ``default`` into ``net`` in place: diffusers' ``add_adapter`` where the model has it
    (``PeftAdapterMixin``), else peft's ``inject_adapter_in_model`` (a plain ``ModelMixin`` such as Wan's own)."""
    if hasattr(net, "add_adapter"):
        net.add_adapter(config)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, net, adapter_name="default")


def set_adapters_enabled(net: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``net`` on or off (off: the base model, the LoRA reference)."""
    if hasattr(net, "enable_adapters"):
        net.enable_adapters() if enabled else net.disable_adapters()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in net.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """The modules in eval mode while inside; after, every submodule back in its own previous mode (not the top
    module's mode spread over all: a network whose base is in eval mode and its new adapters in train mode stays so)."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class DenoiserFinetuning:
    """Mixin for an ``nn.Module`` backend whose trainable networks are ``getattr(self, attr)`` for each
    attribute in ``trained_attrs`` (by default just ``denoiser_attr``; Wan2.2-A14B trains one or both experts).

    The backend defines ``family``, ``cfg`` (with ``finetune``, ``lora``, ``reference_on_cpu``,
    ``pretrained``, or an own ``base_id``) and ``_predict_with(net, noisy, t, cond)``; a backend with several
    denoisers also overrides ``_predict_nets(nets, noisy, t, cond)``, which gets every denoiser by attribute name.
    ``legacy_lora_files`` names LoRA files an older version of the backend wrote (file name, denoiser attribute;
    peft-wrapper keys), read when a weights folder has no ``pytorch_lora_weights.safetensors``.
    """

    denoiser_attr = "denoiser"
    family = "?"
    trained_setting = "the model's trained denoisers"  # the config key that chooses trained_attrs
    legacy_lora_files: tuple[tuple[str, str], ...] = ()

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_attr)

    @property
    def trained_attrs(self) -> tuple[str, ...]:
        return (self.denoiser_attr,)

    @property
    def denoiser_attrs(self) -> tuple[str, ...]:
        """Every denoiser the backend holds, trained or not (predict may use each)."""
        return (self.denoiser_attr,)

    def _trained(self) -> dict[str, nn.Module]:
        return {attr: getattr(self, attr) for attr in self.trained_attrs}

    def setup_finetuning(self, reference_dtype: torch.dtype = torch.float32) -> None:
        """Freeze the denoisers, then add LoRA adapters or make the frozen reference copies of the trained ones."""
        cfg = self.cfg
        check_finetune(cfg.finetune)
        for attr in self.denoiser_attrs:
            getattr(self, attr).requires_grad_(False)
        if getattr(cfg, "init_weights", None):
            self.merge_init_weights(cfg.init_weights)
        self._ref_cpu: dict[str, nn.Module] = {}  # a plain dict: kept out of .to(device) and the state dict
        self.ref_denoisers = nn.ModuleDict()  # on-device reference copies, moved with the backend
        self.reference_copy_skipped = cfg.finetune == "full" and not reference_copy_wanted()
        if cfg.finetune == "lora":
            from peft import LoraConfig

            for net in self._trained().values():
                add_lora(net, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                         target_modules=list(cfg.lora.target_modules), init_lora_weights=True))
                for p in net.parameters():  # adapters train in fp32 over a possibly low-precision base
                    if p.requires_grad:
                        p.data = p.data.float()
            return
        for attr, net in self._trained().items():
            net.requires_grad_(True)
            if self.reference_copy_skipped:
                continue
            reference = copy.deepcopy(net).to(reference_dtype).requires_grad_(False).eval()
            if cfg.reference_on_cpu:
                self._ref_cpu[attr] = reference
            else:
                self.ref_denoisers[attr] = reference

    def setup_gradient_checkpointing(self) -> None:
        """``model.gradient_checkpointing``: the trained denoisers recompute each block's activations in the backward
        pass (diffusers' ``enable_gradient_checkpointing``); a network without it is refused by name."""
        if not getattr(self.cfg, "gradient_checkpointing", False):
            return
        for attr, net in self._trained().items():
            if not getattr(net, "_supports_gradient_checkpointing", False):
                raise UserError(f"model.gradient_checkpointing: {type(self).__name__}'s {attr} ({type(net).__name__}) "
                                f"cannot recompute its activations; set model.gradient_checkpointing=false")
            net.enable_gradient_checkpointing()

    @property
    def ref_denoiser(self) -> nn.Module | None:
        """The frozen on-device reference copy of the (first) trained denoiser in a full fine-tune, else None."""
        attr = self.trained_attrs[0]
        return self.ref_denoisers[attr] if attr in self.ref_denoisers else None

    def merge_init_weights(self, directory: str | Path) -> None:
        """``model.init_weights``: a weights folder (LoRA or full, e.g. an SFT run's) made part of the base.

        It runs before the DPO adapter or the reference copy exists, so the reference is that model.
        """
        directory = Path(directory)
        meta = read_trainable_meta(directory, self.family)
        if meta.get("finetune") == "lora":
            path, by_attr = self._split_lora(directory)
            for attr, state in by_attr.items():
                merge_lora(getattr(self, attr), state, meta["lora"], f"model.init_weights={path}")
            return
        for attr in meta.get("trained", [self.denoiser_attr]):
            self._load_full_denoiser(directory, "model.init_weights", attr)

    def _read_lora(self, directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
        """The LoRA file and its tensors keyed ``<attr>.<peft key>``: ``pytorch_lora_weights.safetensors``, else a
        ``legacy_lora_files`` one, its keys put in that layout."""
        if (directory / LORA_FILE).is_file() or not self.legacy_lora_files:
            return directory / LORA_FILE, read_safetensors(directory, LORA_FILE)
        for name, attr in self.legacy_lora_files:
            if (directory / name).is_file():
                state = read_safetensors(directory, name)
                return directory / name, {f"{attr}.{k.removeprefix(PEFT_MODEL_PREFIX)}": v for k, v in state.items()}
        names = " or ".join([LORA_FILE, *(name for name, _ in self.legacy_lora_files)])
        raise UserError(f"{directory}: no {names}; point at a run's weights/last or weights/step-N folder")

    def _split_lora(self, directory: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
        """The LoRA file and its tensors by denoiser (keys ``<attr>.<peft key>``), each attribute one of ours."""
        path, state = self._read_lora(directory)
        by_attr: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            attr, _, rest = key.partition(".")
            if attr not in self.denoiser_attrs:
                raise UserError(f"{path}: key {key!r} names no denoiser of this model "
                                f"({', '.join(self.denoiser_attrs)}); give the weights of a run on the same base model")
            by_attr.setdefault(attr, {})[rest] = value
        return path, by_attr

    @staticmethod
    def _full_file(attr: str) -> str:
        """Where a plain module's (no ``save_pretrained``) full weights are written: its state dict as safetensors."""
        return f"{attr}.safetensors"

    def _write_full_denoiser(self, directory: Path, attr: str, net: nn.Module) -> None:
        """A diffusers model's ``save_pretrained`` folder ``<attr>/``, else a plain module's ``<attr>.safetensors``."""
        if hasattr(net, "save_pretrained"):
            net.save_pretrained(directory / attr, safe_serialization=True)
            return
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                  str(directory / self._full_file(attr)))

    def _load_full_denoiser(self, directory: Path, key: str, attr: str | None = None) -> None:
        """A denoiser ``save_trainable`` wrote in full: safetensors only, as it is written."""
        attr = attr or self.denoiser_attr
        net = getattr(self, attr)
        if not hasattr(net, "save_pretrained"):
            name = self._full_file(attr)
            load_state_strict(net, read_safetensors(directory, name), f"{key}={directory / name}")
            return
        with named_load_errors(directory / attr, f"{key}={directory}", read_bin=False):
            loaded = type(net).from_pretrained(directory, subfolder=attr, local_files_only=True, use_safetensors=True)
        net.load_state_dict(loaded.state_dict(), strict=True)

    def _predict_nets(self, nets: dict[str, nn.Module], noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._predict_with(nets[self.denoiser_attr], noisy, t, cond)

    def _live_nets(self) -> dict[str, nn.Module]:
        return {attr: getattr(self, attr) for attr in self.denoiser_attrs}

    def predict(self, noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self._predict_nets(self._live_nets(), noisy, t, cond)

    @contextmanager
    def reference(self) -> Iterator[PredictFn]:
        """Context yielding the frozen reference model's ``predict``, every denoiser it runs in eval mode (a reference
        with dropout, e.g. VC2's temporal convolutions, would not be the fixed model the loss compares against)."""
        if self.cfg.finetune == "lora":
            for net in self._trained().values():
                set_adapters_enabled(net, False)
            try:
                with eval_mode(*self._live_nets().values()):
                    yield self.predict
            finally:
                for net in self._trained().values():
                    set_adapters_enabled(net, True)
            return
        if self.reference_copy_skipped:
            raise UserError(f"{type(self).__name__} {NO_REFERENCE_COPY}")
        nets = {**self._live_nets(), **dict(self.ref_denoisers.items())}
        device = next(self.denoiser.parameters()).device
        for attr, reference in self._ref_cpu.items():
            nets[attr] = reference.to(device)
        try:
            with eval_mode(*nets.values()):  # the Trainer's .train() on the backend reaches the on-device copies too
                yield partial(self._predict_nets, nets)
        finally:
            for reference in self._ref_cpu.values():
                reference.to("cpu")

    def restore_trainable(self) -> None:
        """Re-assert exactly which parameters train (LoRA: the adapters; full: the whole trained denoisers) and put
        the trained denoisers in train mode: after a host (VideoTuna's ``set_trainable_components``) marked others."""
        for net in self._trained().values():
            if self.cfg.finetune == "lora":
                net.requires_grad_(False)
                for name, p in net.named_parameters():
                    p.requires_grad_("lora_" in name)
            else:
                net.requires_grad_(True)
            net.train()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for net in self._trained().values() for p in net.parameters() if p.requires_grad]

    def base_id(self) -> str:
        """The base weights trained weights are recorded against (``model.pretrained``)."""
        return str(self.cfg.pretrained)

    def _write_lora(self, directory: Path, layers: dict[str, dict[str, torch.Tensor]]) -> None:
        """``layers``: each trained denoiser's peft state dict, by attribute; one file, keys ``<attr>.<key>``."""
        from safetensors.torch import save_file

        save_file({f"{attr}.{k}": v for attr, state in layers.items() for k, v in state.items()},
                  str(directory / LORA_FILE))

    def save_trainable(self, directory: str | Path) -> Path:
        """Write the LoRA adapters or the full denoisers (safetensors) atomically to ``directory``."""
        meta = {"family": self.family, "finetune": self.cfg.finetune, "base": self.base_id(),
                "init_weights": init_weights_id(self.cfg), "trained": list(self.trained_attrs)}
        if self.cfg.finetune == "lora":
            from peft.utils import get_peft_model_state_dict

            meta["lora"] = {"rank": self.cfg.lora.rank, "alpha": self.cfg.lora.alpha,
                            "target_modules": list(self.cfg.lora.target_modules)}
            layers = {attr: {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}
                      for attr, net in self._trained().items()}
            return atomic_directory(directory, lambda tmp: self._write_lora(tmp, layers), meta)

        def write(tmp: Path) -> None:
            for attr, net in self._trained().items():
                self._write_full_denoiser(tmp, attr, net)

        return atomic_directory(directory, write, meta)

    def load_trainable(self, directory: str | Path) -> None:
        """Load what ``save_trainable`` wrote; a LoRA/full, rank or trained-denoiser mismatch is an error saying which."""
        directory = Path(directory)
        meta = read_trainable_meta(directory, self.family, self.cfg)
        trained = list(meta.get("trained", [self.denoiser_attr]))
        if trained != list(self.trained_attrs):
            raise UserError(f"{directory}: weights of the denoiser(s) {', '.join(trained)}, but this config trains "
                            f"{', '.join(self.trained_attrs)}; set {self.trained_setting} to match")
        if self.cfg.finetune == "lora":
            from peft.utils import set_peft_model_state_dict

            path, by_attr = self._split_lora(directory)
            for attr, state in by_attr.items():
                result = set_peft_model_state_dict(getattr(self, attr), state, adapter_name="default")
                unexpected = list(getattr(result, "unexpected_keys", []) or [])
                if unexpected:
                    raise UserError(f"{path}: keys not in this model's LoRA: {unexpected[:5]}")
            return
        for attr in trained:
            self._load_full_denoiser(directory, "model.trainable_weights", attr)
