"""Units of the pipeline engine that need no stage: step order, sweeps, markers, launcher checks."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from launch.compose import check_type
from launch.launcher import launcher_config
from launch.markers import checksum, stale_reason, write_marker
from launch.plan import Plan, Step, order_steps
from launch.sweep import expand
from model.errors import ConfigError


def test_order_follows_inputs_after_and_placeholders():
    steps = [Step("distill", "distill", ["x=[{ckpt:grpo-a},{ckpt:grpo-b}]"], input="pre"),
             Step("grpo-a", "grpo", input="pre"), Step("grpo-b", "grpo", input="pre", after=["grpo-a"]),
             Step("pre", "pretrain"), Step("export", "export", input="distill")]
    order = [s.name for s in order_steps(steps, "p")]
    assert order.index("pre") < order.index("grpo-a") < order.index("grpo-b") < order.index("distill")
    assert order[-1] == "export"
    assert steps[0].needs({s.name for s in steps}) == ["pre", "grpo-a", "grpo-b"]


@pytest.mark.parametrize("steps, key", [
    ([Step("a", "pretrain"), Step("a", "sft")], "p.steps[1].name"),
    ([Step("a", "pretrain", input="nope-step", after=["ghost"])], "p.steps[0]"),
    ([Step("a", "sft", after=["b"]), Step("b", "sft", input="a")], "p.steps"),
])
def test_order_errors_name_the_field(steps, key):
    with pytest.raises(ConfigError) as e:
        order_steps(steps, "p")
    assert e.value.key == key


def test_sweep_grid():
    points = expand(["optim.lr=1e-3,3e-3", "model=v4-tiny", "+x=range(0,2)"])
    assert points == [["optim.lr=0.001", "model=v4-tiny", "+x=0"],
                      ["optim.lr=0.001", "model=v4-tiny", "+x=1"],
                      ["optim.lr=0.003", "model=v4-tiny", "+x=0"],
                      ["optim.lr=0.003", "model=v4-tiny", "+x=1"]]
    assert expand(["a=1"]) == [["a=1"]]


def test_markers_detect_changed_outputs_inputs_and_overrides(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "sub").mkdir()
    (ckpt / "sub" / "m.json").write_text("{}")
    first = checksum(ckpt)
    assert first == checksum(ckpt) and len(first) == 64
    step_dir = tmp_path / "step"
    step_dir.mkdir()
    assert stale_reason(step_dir, ["a=1"], {}) == "not finished"
    write_marker(step_dir, {"checkpoint": str(ckpt), "overrides": ["a=1"], "inputs": {"pre": "abc"}})
    assert json.loads((step_dir / "DONE.json").read_text())["checksum"] == first
    assert stale_reason(step_dir, ["a=1"], {"pre": "abc"}) is None
    assert "overrides" in stale_reason(step_dir, ["a=2"], {"pre": "abc"})
    assert "input" in stale_reason(step_dir, ["a=1"], {"pre": "abd"})
    (ckpt / "sub" / "m.json").write_text('{"x": 1}')
    assert checksum(ckpt) != first
    assert "missing or changed" in stale_reason(step_dir, ["a=1"], {"pre": "abc"})


def test_plan_roundtrip(tmp_path):
    plan = Plan("p", str(tmp_path), [Step("a", "pretrain", ["x=1"], run_dir=str(tmp_path / "a"))], "slurm")
    path = plan.save()
    assert Plan.load(path) == plan


@pytest.mark.parametrize("launcher, key", [
    ({"name": "cloud"}, "launcher.name"),
    ({"nproc_per_node": "two"}, "launcher.nproc_per_node"),
    ({"nproc_per_node": 0}, "launcher.nproc_per_node"),
    ({"nodes": 2}, "launcher.nodes"),
    ({"partiton": "gpu"}, "launcher.partiton"),
    ({"setup": "module load x"}, "launcher.setup"),
])
def test_launcher_errors_name_the_key(launcher, key):
    with pytest.raises(ConfigError) as e:
        launcher_config(OmegaConf.create({"launcher": launcher}))
    assert e.value.key == key


def test_launcher_defaults_and_world_size():
    lc = launcher_config(OmegaConf.create({"launcher": {"name": "slurm", "nodes": 2, "nproc_per_node": 4}}))
    assert lc.world_size == 8 and lc.time == "01:00:00"
    assert launcher_config(OmegaConf.create({})).name == "local"


@pytest.mark.parametrize("default, value, ok", [
    (3, 4, True), (3, "abc", False), (3, 2.5, False), (3, True, False), (0.1, 1, True), (0.1, "x", False),
    (True, False, True), (True, 1, False), ("auto", 5, True), (None, "x", True),
])
def test_check_type(default, value, ok):
    cfg = OmegaConf.create({"d": default, "v": value})
    if ok:
        check_type("k.x", cfg.d, cfg.v)
    else:
        with pytest.raises(ConfigError, match="k.x: expected"):
            check_type("k.x", cfg.d, cfg.v)


@pytest.mark.parametrize("raw, key", [
    ({"name": "a", "stage": "pretrain", "overides": []}, "p: steps[0].overides"),
    ({"name": "a b", "stage": "pretrain"}, "p: steps[0].name"),
    ({"name": "slurm", "stage": "pretrain"}, "p: steps[0].name"),
    ({"name": "a", "stage": "pretrian"}, "p: steps[0].stage"),
    ({"name": "a", "stage": "sft", "overrides": "init=x"}, "p: steps[0].overrides"),
    ({"name": "a", "stage": "sft", "input": 3}, "p: steps[0].input"),
    (["pretrain"], "p: steps[0]"),
])
def test_pipeline_step_fields_are_checked(tmp_path, raw, key):
    from launch.planner import _step

    with pytest.raises(ConfigError) as e:
        _step(0, raw, "p", tmp_path)
    assert e.value.key == key


@pytest.mark.parametrize("path", ["/runs/demo/pretrain/checkpoints/step-3", "/tmp/with space/x", "/tmp/it's",
                                  "/a:b=c,d", "C:\\runs\\x"])
def test_paths_survive_the_override_parser(path):
    from launch.compose import parse
    from launch.step import quote

    assert parse([f"init={quote(path)}"])[0].value() == path


def test_report_shows_outcomes_export_and_generation(tmp_path):
    from launch.report import format_report

    steps = [Step(n, st, run_dir=str(tmp_path / n)) for n, st in
             (("grpo-math", "grpo"), ("export", "export"), ("generate", "generate"), ("distill", "distill"))]
    for s in steps:
        (tmp_path / s.name).mkdir()
    write_marker(tmp_path / "grpo-math", {"metrics": {"steps": 10, "n_val": 128, "accuracy_before": 0.1,
                                                      "accuracy_after": 0.25}, "seconds": 61.2})
    write_marker(tmp_path / "export", {"checkpoint": str(tmp_path / "export"), "metrics": {"params": 5}})
    write_marker(tmp_path / "generate", {"summary": {"prompt": "2+2?", "completion": "4"}, "metrics": {}})
    text = format_report(Plan("demo", str(tmp_path), steps))
    assert "accuracy_before=0.1, accuracy_after=0.25, steps=10, n_val=128" in text and "61s" in text
    assert f"exported model: {tmp_path / 'export'}" in text and "generation: '2+2?' -> '4'" in text
    assert "distill" in text and "not finished" in text
    assert (tmp_path / "report.txt").read_text() == text


def test_stage_groups_take_the_issue_command_lines():
    from launch.planner import with_stage_key
    from launch.stages import get_stage

    assert with_stage_key(get_stage("sft"), ["domain=math", "domain.n_val=3"]) == [
        "stage=sft", "+domain=math", "domain.n_val=3"]
    assert with_stage_key(get_stage("grpo"), ["+domain=code"]) == ["stage=grpo", "+domain=code"]
    assert with_stage_key(get_stage("distill"), ["student=s", "teachers.math=t"]) == [
        "stage=distill", "student=s", "teachers.math=t", "+distill=default"]
    assert with_stage_key(get_stage("distill"), ["+distill=default"]) == ["stage=distill", "+distill=default"]
    assert with_stage_key(get_stage("pretrain"), ["stage=pretrain"]) == ["stage=pretrain"]
