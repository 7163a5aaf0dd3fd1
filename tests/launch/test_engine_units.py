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
    ({"threads": 0}, "launcher.threads"),
    ({"threads": "one"}, "launcher.threads"),
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
             (("pretrain", "pretrain"), ("grpo-code", "grpo"), ("distill", "distill"), ("export", "export"),
              ("generate", "generate"), ("info", "model-info"), ("later", "sft"))]
    for s in steps:
        (tmp_path / s.name).mkdir()
    write_marker(tmp_path / "pretrain", {"metrics": {"steps": 120, "first_loss": 8.34, "final_loss": 4.5,
                                                     "first_val_loss": 8.33, "final_val_loss": 4.61},
                                         "seconds": 250.0, "cpu_seconds": 200.0})
    write_marker(tmp_path / "grpo-code", {"summary": {"domain": "code"}, "seconds": 61.2, "metrics": {
        "steps": 10, "n_val": 128, "accuracy_before": 0.1, "accuracy_after": 0.25, "reward_first": 0.05,
        "reward_last": 0.3}})
    write_marker(tmp_path / "distill", {"seconds": 30, "cpu_seconds": 25.5, "metrics": {"domains": {
        "math": {"student_score_before": 0.0, "student_score": 0.125, "teacher_score": 0.25,
                 "kl_first": 7.954, "kl_final": 4.1612},
        "code": {"student_score_before": None, "student_score": 0.5, "teacher_score": 0.5}}}})
    write_marker(tmp_path / "export", {"checkpoint": str(tmp_path / "export"),
                                       "metrics": {"params": 4424550, "max_logit_diff": 6.5e-07}})
    write_marker(tmp_path / "generate", {"summary": {"prompt": "2+2?", "completion": "4\n" + "x" * 300},
                                         "metrics": {"new_tokens": 32, "seconds": 1.04}})
    write_marker(tmp_path / "info", {"metrics": {"total_params": 5, "active_params": 2, "name": "x"}})
    text = format_report(Plan("demo", str(tmp_path), steps), elapsed=400.0)
    lines = text.splitlines()
    assert lines[1].split() == ["pretrain", "pretrain", "4m10s", "val", "loss", "8.330", "->", "4.610,",
                                "train", "loss", "8.340", "->", "4.500", "(120", "steps)"]
    assert "code held-out pass rate 10.0% -> 25.0% (n=128, 10 steps), reward 0.05 -> 0.30" in lines[2]
    assert lines[2].split()[2] == "1m01s"
    assert lines[3].endswith("code pass rate: student 50.0% vs teacher 50.0%")  # one line per domain
    assert lines[4].strip() == ("math accuracy: student 0.0% -> 12.5% vs teacher 25.0%, "
                                "KL to the teacher 7.954 -> 4.161")
    assert "4.42M parameters, transformers' logits within 6.5e-07 of the checkpoint's" in lines[5]
    assert "32 new tokens through transformers in 1.0s" in lines[6]
    assert lines[7].endswith("total_params=5, active_params=2")  # a stage without its own line
    assert lines[8].split()[-2:] == ["not", "finished"]
    assert lines[9] == "  step times add up to 5m41s (CPU 3m46s); this command ran 6m40s"  # 250 + 61.2 + 30 s
    assert f"exported model: {tmp_path / 'export'}" in text
    assert 'generation: "2+2?" -> "4\\n' + "x" * 198 + '..."' in text  # on one line, cut at MAX_COMPLETION
    assert (tmp_path / "report.txt").read_text() == text


def test_progress_says_where_a_step_is(tmp_path):
    from launch.progress import duration, label, position, status_line

    assert [duration(s) for s in (0.4, 59.6, 61, 3599, 3725)] == ["0s", "1m00s", "1m01s", "59m59s", "1h02m"]
    plan = Plan("p", str(tmp_path), [Step(n, "sft", run_dir=str(tmp_path / n)) for n in ("a", "b", "c")])
    assert label(plan, "b") == "step 2/3 b"
    assert label(Plan("a", str(tmp_path), plan.steps[:1]), "a") == "step a"  # a single stage
    assert position(tmp_path / "a") is None
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 8}\n{"step": 20, "loss": 7}\n{"st')
    assert position(tmp_path / "a") == "20"  # a half-written last line is passed over
    saved = tmp_path / "a" / ".hydra" / "config.yaml"
    OmegaConf.save(OmegaConf.create({"trainer": {"max_steps": 40}}), saved)
    assert status_line(plan, ["a", "b"], 250) == "[moeforge] 4m10s: a at step 20/40, b starting"


def test_threads_setting_applies_while_a_step_runs_and_is_undone(monkeypatch):
    import os

    import torch

    from launch.procs import intra_op_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    want = 2 if before == 1 else 1
    with intra_op_threads(want):
        assert torch.get_num_threads() == want and os.environ["OMP_NUM_THREADS"] == str(want)
    assert torch.get_num_threads() == before and os.environ["OMP_NUM_THREADS"] == "2"
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


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
