"""OptimConfig validation and the Hydra group files configs/optim/{muon,adamw}.yaml."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from model.errors import ConfigError
from optim.config import OptimConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("choice", ["muon", "adamw"])
def test_group_files_compose_and_validate(choice):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=[f"+optim={choice}", "optim.lr=1e-3", "optim.schedule=cosine"])
    oc = OptimConfig.from_dict(cfg.optim)
    assert oc.name == choice and oc.lr == 1e-3 and oc.schedule == "cosine"
    v4 = (oc.muon_momentum, oc.adam_eps, oc.update_rms, oc.ns_steps, oc.ns_pin_steps)
    assert v4 == (0.95, 1e-20, 0.18, 8, 2)
    assert oc == OptimConfig(name=choice, lr=1e-3, schedule="cosine")  # the yaml defaults are the dataclass's


def test_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.lrr"):
        OptimConfig.from_dict({"lrr": 1.0})
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig.from_dict({"lr": "fast"})
    with pytest.raises(ConfigError, match="optim.schedule"):
        OptimConfig.from_dict({"schedule": "step"})
    with pytest.raises(ConfigError, match="optim.muon_momentum"):
        OptimConfig.from_dict({"muon_momentum": 1.0})
    assert OptimConfig.from_dict({"lr": 1}).lr == 1.0
