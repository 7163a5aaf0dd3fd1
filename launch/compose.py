"""Compose a stage's Hydra config from overrides, with errors that name the offending key."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs
from launch.launcher import launchers_in_config_store
from launch.stages import StageSpec, load_stage
from model.errors import ConfigError

CONFIG_DIR = Path(configs.__file__).resolve().parent


def parse(overrides: list[str]):
    """Hydra's parsed form of ``overrides``; a ConfigError naming the bad override."""
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError("overrides", f"cannot parse: {e}") from e


def compose_stage(spec: StageSpec, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The stage's config (without the ``hydra`` node) and its run directory (``hydra.run.dir``).

    Unknown keys, missing group options and values whose type differs from the default are ConfigErrors.
    """
    parsed = parse(overrides)
    with _initialize(spec):
        full = _compose(spec.config_name, overrides)
        top_level = [o.input_line for o in parsed if "." not in o.key_or_group and "/" not in o.key_or_group]
        base = _compose(spec.config_name, top_level) if len(top_level) < len(overrides) else full
        HydraConfig.instance().set_config(full)
        run_dir = Path(str(full.hydra.run.dir))
    cfg = OmegaConf.masked_copy(full, [k for k in full if k != "hydra"])
    for o in parsed:
        if not o.is_hydra_override() and "." in o.key_or_group and o.value_type is not None:
            check_type(o.key_or_group, _select(base, o.key_or_group), _select(cfg, o.key_or_group))
    return cfg, run_dir


@contextmanager
def _initialize(spec: StageSpec):
    """Hydra's context for the stage: configs/ for the root config; else only the stage's structured
    config and the launcher group, so that its keys may share names with config groups
    (``generate model=<dir>``)."""
    if spec.config_name == "config":
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name=spec.name):
            yield
        return
    load_stage(spec)  # registers its structured config
    with launchers_in_config_store(), initialize(config_path=None, version_base=None, job_name=spec.name):
        yield


def check_type(key: str, default, value) -> None:
    """Raise a ConfigError if ``value`` cannot stand where the config's default is ``default``."""
    if default is None or value is None or default == "???":
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "a bool"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an int"
    elif isinstance(default, float):
        ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a float"
    elif isinstance(default, str):
        ok, kind = not isinstance(value, ListConfig | DictConfig), "a string"
    elif isinstance(default, ListConfig):
        ok, kind = isinstance(value, ListConfig), "a list"
    elif isinstance(default, DictConfig):
        ok, kind = isinstance(value, DictConfig), "a mapping"
    else:
        ok, kind = True, ""
    if not ok:
        raise ConfigError(key, f"expected {kind} like the default {_show(default)}, got {_show(value)}")


def _show(v) -> str:
    return repr(OmegaConf.to_container(v) if isinstance(v, ListConfig | DictConfig) else v)


def _select(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except MissingConfigException as e:
        raise _missing(config_name, overrides, e) from e
    except (HydraException, OmegaConfBaseException) as e:
        raise _translate(e) from e


def _missing(config_name: str, overrides: list[str], e: MissingConfigException) -> ConfigError:
    m = re.search(r"Could not find '([^']+)/([^']+)'", str(e))
    if m:
        opts = re.findall(r"^\t(\S+)$", str(e), flags=re.M)
        return ConfigError(m.group(1), f"no option {m.group(2)!r} in configs/{m.group(1)}/"
                           + (f"; available: {', '.join(opts)}" if opts else ""))
    return ConfigError("config", f"{config_name}: {str(e).splitlines()[0]}")


def _translate(e: Exception) -> ConfigError:
    msg = str(e)
    m = re.search(r"Could not override '([^']+)'", msg)
    if m:
        return ConfigError(m.group(1), "unknown key (not in the config; check the spelling)")
    m = re.search(r"Could not append to config\. An item is already at '([^']+)'", msg)
    if m:
        return ConfigError(m.group(1), "already exists; set it without '+'")
    cause = e.__cause__ or e
    key = getattr(cause, "full_key", None) or getattr(e, "full_key", None)
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return ConfigError(key or "overrides", first)


def sweep_dir(spec: StageSpec, overrides: list[str]) -> Path:
    """``hydra.sweep.dir`` for these overrides: the parent of a multirun's per-point run directories."""
    with _initialize(spec):
        full = _compose(spec.config_name, overrides)
        HydraConfig.instance().set_config(full)
        return Path(str(full.hydra.sweep.dir))
