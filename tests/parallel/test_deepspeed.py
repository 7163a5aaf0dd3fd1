"""Issue 12 on CPU/gloo, 2 processes, fp32, one torchrun launch: DeepSpeed ZeRO-1/2/3 (dp2, and experts
over ep2, and ZeRO-3 with CPU offload) take the same 3 steps as the native FSDP2 engine and as one process
within 1e-5; a ZeRO-3 checkpoint resumes under the native engine and a native one under ZeRO-3 as the
uninterrupted run; a Muon step swapped for AdamW is stopped by the first-step Muon check; a step the spike
guard skips leaves the run as it was."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import worker as W
from dist_harness import assert_matches, torchrun

from optim import build_optimizer
from train import checkpoint
from train.parallel.deepspeed.convert import to_single_process

WORKER = Path(__file__).with_name("deepspeed_worker.py")
ZERO = ["zero1:dp2", "zero2:dp2", "zero3:dp2", "zero1:ep2", "zero2:ep2", "zero3:ep2@save=zero3",
        "zero3+offload:ep2"]
RESUMED = ["fsdp:ep2@resume=zero3", "zero3:ep2@resume=native"]
SPECS = ["fsdp:dp2", "fsdp:ep2@save=native", *ZERO, *RESUMED, "fallback:zero2:dp2", "skip:zero3:ep2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def results(root):
    return torchrun(2, root / "out.json", root, SPECS, worker=WORKER)


def _steps(results: dict, specs: list[str]) -> dict:
    return {"reference": results["reference"]["steps"], **{s: results[s]["steps"] for s in specs}}


def _native(spec: str) -> str:
    return "fsdp:ep2@save=native" if ":ep2" in spec else "fsdp:dp2"


def test_zero_stages_take_the_native_engines_steps(results):
    assert_matches(_steps(results, ["fsdp:dp2", "fsdp:ep2@save=native", *ZERO]))  # against one process
    for spec in ZERO:  # against the native FSDP2 run of the same layout
        native = results[_native(spec)]["steps"]
        assert_matches({"reference": native, spec: results[spec]["steps"]})


def test_zero_really_shards_and_steps_moeforges_optimizer(results):
    for spec in ZERO:
        facts = results[spec]
        assert facts["wraps_moeforge"], spec
        stage3 = spec.startswith("zero3")
        expected = "DeepSpeedZeroOptimizer_Stage3" if stage3 else "DeepSpeedZeroOptimizer"
        assert facts["zero_optimizer"] == expected, spec
        if ":dp2" in spec:  # every parameter is data-parallel: this rank holds about half the fp32 master
            assert 0.45 < facts["master_share"] < 0.55, (spec, facts)
        if stage3:
            assert facts["partitioned_share"] > 0.95, (spec, facts)


def test_checkpoints_resume_across_engines(results):
    for spec in RESUMED:
        steps = results[spec]["steps"]
        assert steps[0] is None and steps[-1] is not None, spec  # resumed after step 1
    assert_matches(_steps(results, RESUMED))
    assert_matches({"reference": results["zero3:ep2@save=zero3"]["steps"],
                    "fsdp:ep2@resume=zero3": results["fsdp:ep2@resume=zero3"]["steps"]})
    assert_matches({"reference": results["fsdp:ep2@save=native"]["steps"],
                    "zero3:ep2@resume=native": results["zero3:ep2@resume=native"]["steps"]})


def test_a_skipped_step_changes_nothing(results):
    assert_matches(_steps(results, ["skip:zero3:ep2"]))


def test_a_muon_fallback_is_stopped(results):
    fallback = results["fallback:zero2:dp2"]
    assert fallback["raised"] and "did not apply moeforge's Muon update" in fallback["message"]


def test_checkpoints_of_both_engines_continue_in_one_process(results, root):
    """The step-1 checkpoints of ZeRO-3 (ep2) and of the native engine (ep2) become one-process checkpoints
    (what `moeforge export` and `init=` read); one process resumes each as the uninterrupted run."""
    config = {"model": W.MODEL, "optim": dataclasses.asdict(W.OPTIM)}
    for name in ("zero3", "native"):
        path = to_single_process(root / name, root / f"single-{name}", config)
        model = W.new_model()
        optimizer, _ = build_optimizer(model, W.OPTIM)
        assert checkpoint.load(path, model, optimizer).step == W.SAVE_AT
        assert_matches({"reference": results["reference"]["steps"],
                        name: W.reference(model, optimizer, first=W.SAVE_AT)})
