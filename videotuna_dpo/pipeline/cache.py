"""``videotuna cache``: encode a preference dataset once, so training never runs the VAE or T5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from videotuna_dpo.config import validate
from videotuna_dpo.data.datamodule import PreferenceDataSchema
from videotuna_dpo.data.latent_cache import build_cache
from videotuna_dpo.errors import UserError
from videotuna_dpo.fileio import check_writable_dir
from videotuna_dpo.pipeline.generate import load_backend
from videotuna_dpo.jobs import Launch


def cache_dataset(cfg: Any, registry: Any, data: str | Path, out: str | Path, shard_size: int = 32,
                  backend: Any = None, source: str = "<config>", launch: Launch | None = None) -> dict[str, Any]:
    """Encode ``data`` (a dataset dir or train_data.yaml) at the config's training settings into ``out``
    (on the processes of ``launch``)."""
    data_cfg = validate(OmegaConf.merge(cfg.get("data") or {}, {"train_data": str(data), "cache": None}),
                        PreferenceDataSchema, "data", source)
    check_writable_dir(out, f"--out {out}")  # before the model loads
    if backend is None:
        if not hasattr(registry.get("model", cfg.model.name), "latent_distribution"):
            raise UserError(f"{source}: model {cfg.model.name} has no latent_distribution, so its latents cannot be "
                            f"cached; train it from the videos (no data.cache)")
        backend = load_backend(OmegaConf.merge(cfg, {"model": {"load_text_and_vae": True}}), registry, source=source)
    return build_cache(cfg.model, data_cfg, backend, data, out, shard_size=shard_size,
                       batch_size=max(1, int(data_cfg.batch_size)), launch=launch)
