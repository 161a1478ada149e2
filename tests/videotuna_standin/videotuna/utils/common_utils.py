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
    if "target" not in config:
        raise KeyError("Expected key `target` to instantiate.")
    return get_obj_from_str(config["target"])(**get_params(config, resolve))
