"""LR schedules at key steps, and where decay (and the MTP weight drop) starts."""

import math

import pytest

from model.errors import ConfigError
from optim.config import OptimConfig
from optim.schedule import LRSchedule, build_schedule


def test_wsd_linear_key_steps():
    s = LRSchedule(peak_lr=1.0, total_steps=100, warmup_steps=10, kind="wsd", min_lr_ratio=0.1,
                   decay_fraction=0.2, decay_shape="linear")
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(4) == pytest.approx(0.5)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == s.lr_at(79) == 1.0
    assert s.decay_start == 80
    assert s.lr_at(80) == pytest.approx(1.0)
    assert s.lr_at(99) == pytest.approx(0.1)
    assert s.lr_at(80 + 19 / 2) == pytest.approx(0.55)
    assert s.lr_at(500) == pytest.approx(0.1)
    assert not s.in_decay(79) and s.in_decay(80) and s.in_decay(99)


def test_wsd_cosine_decay_shape():
    s = LRSchedule(peak_lr=2.0, total_steps=50, warmup_steps=0, kind="wsd", min_lr_ratio=0.0,
                   decay_fraction=0.5, decay_shape="cosine")
    assert s.decay_start == 25
    assert s.lr_at(0) == 2.0
    mid = 25 + 24 * 0.25
    assert s.lr_at(mid) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_at(49) == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_warmup():
    s = LRSchedule(peak_lr=1.0, total_steps=22, warmup_steps=5, kind="cosine", min_lr_ratio=0.2)
    assert s.lr_at(0) == pytest.approx(0.2)
    assert s.lr_at(5) == pytest.approx(1.0)
    assert s.lr_at(13) == pytest.approx(0.2 + 0.8 * 0.5)
    assert s.lr_at(21) == pytest.approx(0.2)
    assert not s.in_decay(4) and s.in_decay(5)


def test_no_decay_when_fraction_zero():
    s = LRSchedule(peak_lr=1.0, total_steps=10, warmup_steps=2, kind="wsd", decay_fraction=0.0)
    assert s.lr_at(9) == 1.0 and s.lr_at(50) == 1.0
    assert not any(s.in_decay(i) for i in range(20))


def test_from_config_and_errors():
    s = build_schedule(OptimConfig(lr=3e-4, warmup_steps=10, decay_fraction=0.5, min_lr_ratio=0.1), 100)
    assert s.lr_at(9) == pytest.approx(3e-4) and s.lr_at(99) == pytest.approx(3e-5)
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        LRSchedule(peak_lr=1.0, total_steps=10, warmup_steps=11)
    with pytest.raises(ConfigError, match="optim.schedule"):
        LRSchedule(peak_lr=1.0, total_steps=10, kind="step")
