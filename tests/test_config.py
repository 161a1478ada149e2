from dataclasses import dataclass, field

import pytest

from videotuna_dpo.config import ConfigError, check_kwargs, load_config, validate


@dataclass
class LoraSchema:
    rank: int = 4
    alpha: float = 4.0


@dataclass
class ModelSchema:
    name: str = "???"
    lora: LoraSchema = field(default_factory=LoraSchema)


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_overrides_merge_dotted_keys_with_yaml_values(tmp_path):
    path = write(tmp_path, "model:\n  name: cogvideox\n  lora: {rank: 4}\noptimizer: {lr: 1.0e-4}\n")
    cfg = load_config(path, ["optimizer.lr=2e-5", "model.lora.rank=16", "plugins=[dpo]", "new.key=[1,2]"])
    assert cfg.optimizer.lr == pytest.approx(2e-5)
    assert cfg.model.lora.rank == 16
    assert list(cfg.plugins) == ["dpo"]
    assert list(cfg.new.key) == [1, 2]
    assert cfg.model.name == "cogvideox"


def test_malformed_override_is_rejected(tmp_path):
    path = write(tmp_path, "a: 1\n")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(path, ["a"])


def test_mistyped_key_error_names_the_full_dotted_path(tmp_path):
    path = write(tmp_path, "model:\n  name: cogvideox\n  lora: {rnak: 8}\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError) as info:
        validate(cfg.model, ModelSchema, "model", str(path))
    message = str(info.value)
    assert "unknown key 'model.lora.rnak'" in message
    assert "Did you mean 'model.lora.rank'?" in message
    assert str(path) in message


def test_mistyped_override_is_caught_by_validation(tmp_path):
    path = write(tmp_path, "model:\n  name: cogvideox\n")
    cfg = load_config(path, ["model.lora.alhpa=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.lora\.alhpa'\. Did you mean 'model\.lora\.alpha'"):
        validate(cfg.model, ModelSchema, "model", str(path))


def test_wrong_type_and_missing_values_name_the_key(tmp_path):
    path = write(tmp_path, "model:\n  lora: {rank: many}\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"bad value for 'model\.lora\.rank'"):
        validate(cfg.model, ModelSchema, "model", str(path))
    with pytest.raises(ConfigError, match=r"missing required key\(s\): model\.name"):
        validate(load_config(write(tmp_path, "model: {}\n")).model, ModelSchema, "model")


def test_validation_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model: {name: x}\n"))
    model = validate(cfg.model, ModelSchema, "model")
    assert model.lora.rank == 4 and model.lora.alpha == 4.0


def test_check_kwargs_names_unknown_trainer_key():
    def trainer(max_steps=1, precision="32"):
        return None

    assert check_kwargs({"max_steps": 3}, trainer, "lightning.trainer") == {"max_steps": 3}
    with pytest.raises(ConfigError, match=r"unknown key 'lightning\.trainer\.max_step'\. Did you mean 'lightning\.trainer\.max_steps'"):
        check_kwargs({"max_step": 3}, trainer, "lightning.trainer")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs" / "dpo").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_dpo_config_validates_block_by_block(path):
    """Every key of a shipped config is one its block's schema knows, in range, before anything loads."""
    from omegaconf import OmegaConf

    from videotuna_dpo.sampling import GENERATE_RULES, GenerateSchema
    from videotuna_dpo.config import check_values
    from videotuna_dpo.registry import Registry
    from videotuna_dpo.strategy import TrainSchema, check_trainer_kwargs, check_training_values

    cfg = load_config(path)
    for block, key in (("model", "pretrained"), ("data", "train_data")):  # left for the command line
        if OmegaConf.is_missing(cfg[block], key):
            cfg[block][key] = "given/on/the/command/line"
    top = validate(cfg, TrainSchema, "", str(path))
    check_training_values(top.dpo, top.optimizer, "", str(path))
    check_trainer_kwargs(OmegaConf.to_container(top.lightning.trainer, resolve=True), str(path))
    registry = Registry.load()
    backend = registry.get("model", cfg.model.name)
    schema = getattr(backend, "schema", None)
    if isinstance(schema, type) and schema is not object:
        validate(cfg.model, schema, "model", str(path))
    registry.get("datamodule", cfg.data.get("name", "preference")).from_config(cfg.data, str(path))
    check_values(validate(cfg.get("generate"), GenerateSchema, "generate", str(path)), "generate", GENERATE_RULES,
                 str(path))
