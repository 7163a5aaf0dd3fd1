"""train/step_profile.py: what counts as which communication, the busy-time union, and the config keys."""

import pytest

from model.errors import ConfigError
from train.config import validate
from train.step_profile import _union_ms, comm_kind


def test_comm_kinds_from_process_group_event_names():
    assert comm_kind("nccl:all_to_all") == comm_kind("gloo:all_to_all") == "all_to_all"
    assert comm_kind("nccl:send 0->1") == comm_kind("gloo:recv") == "p2p"
    assert comm_kind("nccl:all_reduce") == comm_kind("gloo:barrier") == "other_collective"
    assert comm_kind("nccl:_reduce_scatter_base") == "other_collective"
    assert comm_kind("aten::mm") is None and comm_kind("c10d::alltoall_base_") is None


def test_busy_time_is_the_union_of_kernel_intervals():
    assert _union_ms([]) == 0
    assert _union_ms([(0, 1000), (500, 1500), (3000, 4000)]) == pytest.approx(2.5)
    assert _union_ms([(0, 4000), (1000, 2000)]) == pytest.approx(4.0)


def test_profile_keys_are_validated(compose_cfg):
    for key, value in (("steps", -1), ("first_step", 0)):
        with pytest.raises(ConfigError, match=f"trainer.profile.{key}"):
            validate(compose_cfg(f"trainer.profile.{key}={value}"))
