"""The VideoTuna host: lazy import, building its flows from YAML, loading VC2 checkpoints safely, and what every
backend over a VideoTuna flow shares (:class:`VideoTunaFlowBackend`).

VideoTuna is a repository checkout (not a PyPI package); nothing here imports it until a
VideoTuna-backed model is chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from videotuna_dpo.checkpoint_io import load_weights
from videotuna_dpo.config import validate
from videotuna_dpo.errors import UserError
from videotuna_dpo.models.base import load_state_strict
from videotuna_dpo.models.finetune import DenoiserFinetuning
from videotuna_dpo.user_files import load_yaml_config

VIDEOTUNA_REPO = "https://github.com/VideoVerses/VideoTuna"
# VideoTuna's split-checkpoint file names (GenerationBase's Component.get_component_path()).
SPLIT_FILES = {"denoiser": "denoiser.ckpt", "first_stage_model": "first_stage_model.ckpt",
               "cond_stage_model": "cond_stage_model.ckpt"}
# Key prefixes of the original VideoCrafter2 model.ckpt, per flow component.
VC2_PREFIXES = {"denoiser": "model.diffusion_model.", "first_stage_model": "first_stage_model.",
                "cond_stage_model": "cond_stage_model."}


# The per-block checkpoint switches of VideoTuna's (VideoCrafter's) UNetModel: ResBlock.use_checkpoint and
# BasicTransformerBlock.checkpoint, both built from the UNet config's use_checkpoint (true in VC2's shipped config).
HOST_CHECKPOINT_SWITCHES = ("use_checkpoint", "checkpoint")


def set_host_checkpointing(denoiser: torch.nn.Module, enabled: bool | None, family: str) -> bool:
    """``model.gradient_checkpointing`` on a VideoTuna UNet: every block's switch set to ``enabled`` (None: as the host
    config built them). Returns whether any block recomputes its activations in the backward pass."""
    switches = [(module, name) for module in denoiser.modules() for name in HOST_CHECKPOINT_SWITCHES
                if isinstance(getattr(module, name, None), bool)]
    if enabled and not switches:
        raise UserError(f"model.gradient_checkpointing: the {family} denoiser ({type(denoiser).__name__}) has no "
                        f"per-block checkpoint switch (use_checkpoint / checkpoint, as in VideoTuna's UNetModel); "
                        f"set model.gradient_checkpointing=false")
    if enabled is not None:
        for module, name in switches:
            setattr(module, name, bool(enabled))
    return any(getattr(module, name) for module, name in switches)


class VideoTunaMissingError(UserError):
    """A VideoTuna-backed model was chosen but VideoTuna cannot be imported."""


def import_videotuna(module: str, backend: str, checkpoint_keys: str) -> Any:
    """Import ``module`` of VideoTuna, or say exactly why not and how to fix it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (exc.name == "videotuna" or exc.name.startswith("videotuna.")):
            raise VideoTunaMissingError(
                f"model.name={backend} needs VideoTuna ({VIDEOTUNA_REPO}), which is not importable "
                f"(no module {exc.name!r}). VideoTuna is a repository checkout, not a PyPI package: clone "
                f"it, install its requirements, and put the checkout on PYTHONPATH "
                f"(export PYTHONPATH=/path/to/VideoTuna:$PYTHONPATH), or run from inside it. Then point "
                f"{checkpoint_keys}."
            ) from exc
        raise VideoTunaMissingError(
            f"model.name={backend}: VideoTuna was found but importing {module} failed because its "
            f"dependency {exc.name!r} is missing; install VideoTuna's requirements ({exc})"
        ) from exc


def videotuna_root() -> Path | None:
    """The checkout directory holding the importable ``videotuna`` package, if any."""
    spec = importlib.util.find_spec("videotuna")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def resolve_host_path(path: str, key: str) -> Path:
    """A path as given, else relative to the VideoTuna checkout (its configs/ live there)."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    root = videotuna_root()
    if root is not None and (root / path).exists():
        return root / path
    where = f" or under the VideoTuna checkout {root}" if root is not None else ""
    raise UserError(f"{key}={path}: not found in the working directory{where}")


def flow_section(host_config: str | None, flow: Any, key: str) -> DictConfig:
    """The VideoTuna flow section (``target`` + ``params``) from ``host_config``'s ``flow:`` or inline."""
    if flow:
        section = OmegaConf.create(flow) if not isinstance(flow, DictConfig) else flow.copy()
        source = f"{key}.flow"
    elif host_config:
        path = resolve_host_path(host_config, f"{key}.host_config")
        loaded = load_yaml_config(path)
        if "flow" not in loaded:
            raise UserError(f"{path}: no top-level `flow:` section (a VideoTuna flow YAML has flow.target and flow.params)")
        section = loaded.flow
        source = str(path)
    else:
        raise UserError(f"set {key}.host_config (a VideoTuna flow YAML, e.g. "
                        f"configs/001_videocrafter2/vc2_t2v_320x512.yaml) or an inline {key}.flow section")
    if "target" not in section:
        raise UserError(f"{source}: the flow section needs a `target:` (e.g. videotuna.flow.videocrafter.VideocrafterFlow)")
    return section


def build_flow(section: DictConfig, backend: str, checkpoint_keys: str) -> Any:
    """Instantiate a VideoTuna flow with the host's own ``instantiate_from_config``."""
    common = import_videotuna("videotuna.utils.common_utils", backend, checkpoint_keys)
    target = str(section.target)
    import_videotuna(target.rsplit(".", 1)[0], backend, checkpoint_keys)
    section = section.copy()
    # The host mutates scheduler_config in place; give it a plain, writable dict.
    OmegaConf.set_readonly(section, False)
    return common.instantiate_from_config(section)


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict (or a dict with 'state_dict'), got {type(obj).__name__}")
    return state


def load_vc2_components(ckpt: str | Path, trust_switch: str, trusted: bool,
                        components: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-component state dicts from VC2's ``model.ckpt`` or a VideoTuna split-checkpoint folder."""
    ckpt = Path(ckpt)
    out: dict[str, dict[str, torch.Tensor]] = {}
    if ckpt.is_dir():
        for name in components:
            path = ckpt / SPLIT_FILES[name]
            if not path.is_file():
                raise UserError(f"{ckpt}: VideoTuna split checkpoint lacks {SPLIT_FILES[name]} "
                                f"(expected {', '.join(SPLIT_FILES[c] for c in components)})")
            out[name] = _state_dict(load_weights(path, trust_switch, trusted), path)
        return out
    state = _state_dict(load_weights(ckpt, trust_switch, trusted), ckpt)
    for name in components:
        prefix = VC2_PREFIXES[name]
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            raise UserError(f"{ckpt}: no '{prefix}*' keys; not a VideoCrafter2 model.ckpt "
                            f"(or point at a VideoTuna split folder with {', '.join(SPLIT_FILES.values())})")
        out[name] = part
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` whose error names the checkpoint, the first bad keys and the host config."""
    load_state_strict(module, state, what, "check that the host config (the flow's architecture) is the one this "
                                           "checkpoint was trained with")


def adopt_host_lora(flow: Any) -> None:
    """What the host's ``GenerationBase.instantiate_lora`` sets once adapters are in ``flow.denoiser``, so that its
    ``set_trainable_components`` trains just those."""
    flow.use_lora = True
    flow.lora_params = {n for n, _ in flow.denoiser.named_parameters() if "lora_" in n}


def keep_group_norms_fp32(net: nn.Module) -> None:
    """A reduced-precision reference copy keeps its GroupNorms in fp32: the host's lvdm ``GroupNormSpecific``
    normalises ``x.float()``, which CUDA autocast pairs with fp32 weights but CPU autocast does not (a bf16 weight
    there is an error: "mixed dtype (CPU)"). Same numbers on CUDA, a few KiB of memory."""
    for module in net.modules():
        if isinstance(module, nn.GroupNorm):
            module.float()


class VideoTunaFlowBackend(DenoiserFinetuning):
    """What the backends over a VideoTuna flow (``self.flow``) share: ``from_config``, the flow's ``denoiser``
    fine-tuned by :class:`DenoiserFinetuning` with the host told which adapters train, and ``model.ckpt`` as the base
    trained weights are recorded against. A subclass sets ``family``, ``schema``, ``checkpoint_keys`` and
    ``train_ckpt_hint``.
    """

    schema: type = object
    checkpoint_keys = ""

    @classmethod
    def from_config(cls, model_cfg: Any, source: str = "<config>", flow: Any = None) -> "VideoTunaFlowBackend":
        if flow is None:  # without VideoTuna, say so before asking for keys that point into it (host_config, ckpt)
            import_videotuna("videotuna", cls.family, cls.checkpoint_keys)
        cfg = validate(model_cfg, cls.schema, "model", source)
        if flow is None and not cfg.ckpt:
            raise UserError(f"{source}: missing required key model.ckpt; point {cls.checkpoint_keys}")
        return cls(cfg, flow=flow)

    @staticmethod
    def refuse_host_lora(flow: Any) -> None:
        """A flow built with its own ``lora_config`` is refused: the adapters are ours, added after the weights load."""
        if getattr(flow, "use_lora", False):
            raise UserError(f"model: the VideoTuna flow ({type(flow).__name__}) already carries a lora_config; "
                            f"remove it and use model.finetune / model.lora (the adapters are added after the base "
                            f"weights load)")

    @property
    def denoiser(self) -> nn.Module:
        """The flow's denoiser (LoRA adapters are injected into it in place: the host calls the same module)."""
        return self.flow.denoiser

    def base_id(self) -> str:
        return str(self.cfg.ckpt)

    def freeze_text_and_vae(self) -> None:
        for module in (self.flow.first_stage_model, self.flow.cond_stage_model):
            module.requires_grad_(False).eval()

    def setup_host_finetuning(self, reference_dtype: torch.dtype = torch.float32) -> None:
        """Text encoder and VAE frozen, the denoiser set up for LoRA or full fine-tuning, the host's LoRA marks set."""
        self.freeze_text_and_vae()
        self.setup_finetuning(reference_dtype=reference_dtype)
        for reference in (*self.ref_denoisers.values(), *self._ref_cpu.values()):
            keep_group_norms_fp32(reference)
        if self.cfg.finetune == "lora":
            adopt_host_lora(self.flow)
        self.restore_trainable()
