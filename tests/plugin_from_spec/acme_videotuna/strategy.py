import json
from pathlib import Path


class CountStrategy:
    """Counts the pairs of the configured datamodule and the backend's trainable parameters."""

    @classmethod
    def run(cls, cfg, registry, resume=None):
        datamodule = registry.get("datamodule", cfg.data.name).from_config(cfg.data)
        datamodule.setup("fit")
        pairs = sum(len(batch["caption"]) for batch in datamodule.train_dataloader())
        backend = registry.get("model", cfg.model.name).from_config(cfg.model)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result = {"pairs": pairs, "parameters": sum(p.numel() for p in backend.trainable_parameters()),
                  "resume": resume, "scorers": registry.names("scorer")}
        (out / "count.json").write_text(json.dumps(result))
        return out
