"""`OptimConfig`: the validated `optim` config group (configs/optim/muon.yaml, adamw.yaml)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from model.errors import ConfigError


@dataclass
class OptimConfig:
    """optim=muon (V4: Muon + AdamW split by rules) or optim=adamw (everything on AdamW, the baseline)."""

    name: str = "muon"  # muon | adamw
    lr: float = 2.7e-4  # peak LR, shared by Muon (RMS-matched) and AdamW
    weight_decay: float = 0.1
    schedule: str = "wsd"  # wsd | cosine
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # final LR = lr * min_lr_ratio
    decay_fraction: float = 0.1  # wsd: the last fraction of the steps decays
    decay_shape: str = "cosine"  # wsd decay: linear | cosine
    muon_momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 8  # Newton-Schulz steps with (3.4445, -4.7750, 2.0315)
    ns_pin_steps: int = 2  # then steps with (2, -1.5, 0.5)
    ns_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    update_rms: float = 0.18
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-20
    bias_update_speed: float = 0.001

    @classmethod
    def from_dict(cls, d) -> OptimConfig:
        """Build from a dict or DictConfig; unknown keys and wrong types raise ConfigError naming the key."""
        if hasattr(d, "items") and not isinstance(d, dict):
            from omegaconf import OmegaConf

            d = OmegaConf.to_container(d, resolve=True)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in dict(d).items():
            if key not in fields:
                raise ConfigError(f"optim.{key}", f"unknown key; known keys: {', '.join(fields)}")
            kind = type(fields[key].default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"optim.{key}", f"expected {kind.__name__}, got {value!r}")
            kwargs[key] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        choices = {
            "name": ("muon", "adamw"),
            "schedule": ("wsd", "cosine"),
            "decay_shape": ("linear", "cosine"),
            "ns_dtype": ("auto", "bf16", "fp32"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                got = getattr(self, key)
                raise ConfigError(f"optim.{key}", f"must be one of {'|'.join(allowed)}, got {got!r}")
        ranges = {
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "decay_fraction": 0 <= self.decay_fraction <= 1,
            "muon_momentum": 0 <= self.muon_momentum < 1,
            "ns_steps": self.ns_steps >= 0,
            "ns_pin_steps": self.ns_pin_steps >= 0,
            "update_rms": self.update_rms > 0,
            "adam_beta1": 0 <= self.adam_beta1 < 1,
            "adam_beta2": 0 <= self.adam_beta2 < 1,
            "adam_eps": self.adam_eps >= 0,
            "bias_update_speed": self.bias_update_speed >= 0,
        }
        for key, ok in ranges.items():
            if not ok:
                raise ConfigError(f"optim.{key}", f"value {getattr(self, key)!r} is out of range")
        if self.ns_steps + self.ns_pin_steps == 0:
            raise ConfigError("optim.ns_steps", "Muon needs at least one Newton-Schulz step")
