"""Must-show 1 and 2 on CPU/gloo: the loss and gradient norm of 3 steps of every layout equal one process;
a checkpoint saved under pp2 x ep2 resumes under dp2 and under one process as the uninterrupted run."""

from __future__ import annotations

import pytest
from dist_harness import assert_matches, torchrun

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev")
FOUR = ["dp2xep2", "pp2xdp2:1f1b", "pp2xdp2:interleaved_1f1b", "pp2xep2:gpipe@save"]
TWO = ["dp2", "ep2", *[f"pp2:{s}" for s in SCHEDULES], "dp2@resume", "muon"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("parallel") / "checkpoint"


@pytest.fixture(scope="module")
def four(ckpt):
    return torchrun(4, ckpt.parent / "four.json", ckpt, FOUR)


@pytest.fixture(scope="module")
def two(four, ckpt):  # after `four`: resumes its checkpoint
    return torchrun(2, ckpt.parent / "two.json", ckpt, TWO)


def test_four_process_layouts(four):
    assert set(four) == {"reference", *FOUR}
    assert_matches(four)


def test_two_process_layouts_and_resume_under_dp2(two):
    assert set(two) == {"reference", *TWO}
    assert two["dp2@resume"][0] is None and two["dp2@resume"][-1] is not None
    assert_matches(two)


def test_muon_sees_only_whole_matrices(two):
    assert two["muon"] == {"plain_refuses": True, "gathers_2d": True, "experts_local": True}


def test_resume_under_one_process(four, ckpt):
    one = torchrun(1, ckpt.parent / "one.json", ckpt, ["dp1@resume"])
    assert one["dp1@resume"][0] is None
    assert_matches(one)


def test_assert_matches_catches_a_wrong_gradient_norm():
    ref = [{"loss": 2.0, "grad_norm": 1.0}]
    assert_matches({"reference": ref, "dp2": [{"loss": 2.0, "grad_norm": 1.0 + 1e-7}]})
    with pytest.raises(AssertionError, match="dp2 step 1 grad_norm"):
        assert_matches({"reference": ref, "dp2": [{"loss": 2.0, "grad_norm": 1.0001}]})
