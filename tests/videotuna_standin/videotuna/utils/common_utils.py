"""Stand-in for videotuna.utils.common_utils: YAML ``target``/``params`` instantiation."""

import importlib

from omegaconf import DictConfig, OmegaConf


def get_obj_from_str(string, reload=False):
    module, name = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def get_params(config, resolve=True):
    params = config.get("params")
    if params is None:
        return {}
    if resolve and isinstance(params, DictConfig):
        return OmegaConf.to_container(params, resolve=True)
    return params


def instantiate_from_config(config, resolve=False):
    # As the host: these two placeholder strings stand for "no module" (e.g. Wan's scheduler_config).
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("Expected key `target` to instantiate.")
    cls = get_obj_from_str(config["target"])
    # As the host: diffusers/transformers targets and `use_from_pretrained: true` (Wan's WanModel) load themselves.
    target = config["target"]
    if "diffusers" in target or target.startswith("transformers") or config.get("use_from_pretrained", False):
        return cls.from_pretrained(**get_params(config, resolve))
    return cls(**get_params(config, resolve))
