"""train.config.validate: typos and wrong types are errors naming the full key; paths are checked."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from model.errors import ConfigError
from train.config import CheckpointConfig, LoggerConfig, ParallelConfig, TrainerConfig, to_object, validate


def test_defaults_validate_and_fill_every_key(compose_cfg):
    cfg = validate(compose_cfg())
    t = to_object(cfg, "trainer")
    nested = {"spike": t.spike, "profile": t.profile}  # asdict flattens these to dicts
    assert t == TrainerConfig(**{**dataclasses.asdict(TrainerConfig()), **nested})
    assert t.spike == TrainerConfig().spike and t.profile == TrainerConfig().profile
    assert cfg.precision.name == "auto" and cfg.stage == "pretrain" and cfg.resume == "auto"


def test_yaml_lists_every_schema_key(compose_cfg):
    """Every dataclass field is in the yaml, so `group.key=value` overrides work for all of them."""
    cfg = compose_cfg()
    for section, cls in (("trainer", TrainerConfig), ("checkpoint", CheckpointConfig),
                         ("parallel", ParallelConfig), ("logger", LoggerConfig)):
        assert set(cfg[section]) == {f.name for f in dataclasses.fields(cls)}, section


@pytest.mark.parametrize("override, key", [
    ("+trainer.max_stpes=3", "trainer.max_stpes"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("+trainer.spike.factr=2", "trainer.spike.factr"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("+model.hiden_size=8", "model.hiden_size"),
    ("model.num_hidden_layers=3", "model.layer_types"),
    ("optim.lr=-1", "optim.lr"),
    ("+data.pth=x", "data.pth"),
    ("parallel.dp=4", None),
    ("parallel.ep=3", "parallel.ep"),
    ("parallel.pp_schedule=zigzag", "parallel.pp_schedule"),
    ("logger.wandb.mode=loud", "logger.wandb.mode"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.compile=everything", "trainer.compile"),
    ("trainer.seq_len=8192", "trainer.seq_len"),
])
def test_errors_name_the_key(compose_cfg, override, key):
    cfg = compose_cfg(override, *(["parallel.dp=4"] if key == "parallel.ep" else []))
    if key is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == key and str(e.value).startswith(key + ":")


def test_paths_are_checked(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match=f"init: checkpoint {tmp_path / 'nope'} does not exist"):
        validate(compose_cfg(f"init={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="^resume: "):
        validate(compose_cfg(f"resume={tmp_path}"))
    validate(compose_cfg(f"init={tmp_path / 'nope'}"), check_paths=False)


def test_missing_section(compose_cfg):
    cfg = compose_cfg()
    OmegaConf.set_struct(cfg, False)
    del cfg["trainer"]
    with pytest.raises(ConfigError, match="^trainer: section missing"):
        validate(OmegaConf.create(OmegaConf.to_container(cfg)))
