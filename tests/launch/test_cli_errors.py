"""Bad command lines fail before anything starts, with a message naming the key or path."""

from __future__ import annotations

import pytest

from launch.cli import main


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["pretrain", "trainer.max_stpes=3"], "trainer.max_stpes: unknown key"),
    (["pretrain", "trainer.max_steps=three"], "trainer.max_steps: expected an int"),
    (["pretrain", "optim.lr=[1,2]"], "optim.lr: expected a float"),
    (["pretrain", "launcher.nproc_per_node=two"], "launcher.nproc_per_node: expected an int"),
    (["pretrain", "model=v4-huge"], "model: no option 'v4-huge'"),
    (["pretrian"], "unknown stage 'pretrian'"),
    (["pipeline=nope"], "pipeline: no option 'nope'"),
    (["pipeline=smoke", "trainer.seq_lne=8"], "trainer.seq_lne: unknown key"),
    (["pipeline=smoke", "launcher=slurm", "launcher.nodes=zero"], "launcher.nodes: expected an int"),
    (["--multirun", "model-info", "model.hidden_size=64,abc"], "model.hidden_size: expected an int"),
    (["--fast", "model-info"], "unknown option --fast"),
    (["pipeline=demo", "trainer.max_steps=5"], "step pretrain: optim.warmup_steps: 20 > the 5 steps"),
    (["pipeline=demo", "grpo.warmup_steps=9"], "step grpo-math: grpo.warmup_steps: 9 > the 8 steps"),
    (["pipeline=demo", "launcher.threads=0"], "launcher.threads: must be >= 1"),
])
def test_bad_override_names_the_key(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    err = fails(capsys, *args, f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep")
    assert message in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_missing_input_checkpoint_names_the_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-such-checkpoint"
    err = fails(capsys, "pretrain", f"init={missing}", f"hydra.run.dir={tmp_path}/run")
    assert f"init: checkpoint {missing} does not exist" in err
    err = fails(capsys, "pipeline=smoke", f"init={missing}", f"hydra.run.dir={tmp_path}/run")
    assert f"init: checkpoint {missing} does not exist" in err
    assert not (tmp_path / "run").exists()


def test_help_lists_stages_and_pipelines(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "model-info" in out and "smoke" in out and "pipeline=<name>" in out


def test_cfg_prints_the_composed_config_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--cfg", "sft", "+domain=math", "trainer.max_steps=7", f"hydra.run.dir={tmp_path}/run"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "stage: sft" in out and "name: math" in out
    assert not (tmp_path / "run").exists()


def test_command_line_overrides_go_to_the_steps_that_have_the_key(tmp_path):
    from launch.planner import plan_pipeline

    plan = plan_pipeline("demo", ["domain.n_val=8", "max_new_tokens=4", "checkpoint.every=3",
                                  "launcher.threads=2", f"hydra.run.dir={tmp_path}/demo"])
    ovs = {s.name: s.overrides for s in plan.steps}
    assert ovs["sft-math"][-3:] == ["domain.n_val=8", "checkpoint.every=3", "launcher.threads=2"]
    assert "domain.n_val=8" not in ovs["pretrain"] and "checkpoint.every=3" in ovs["pretrain"]
    assert ovs["generate"][-2:] == ["max_new_tokens=4", "launcher.threads=2"]
    assert not any(o.startswith("checkpoint.every") for o in ovs["export"])
    assert plan.run_dir == str(tmp_path / "demo")
    assert not (tmp_path / "demo").exists()
    # the pipeline's own launcher settings, the user's on top: demo.yaml runs two one-thread steps at once
    assert plan.max_parallel == 2 and all(s.launcher["threads"] == 2 for s in plan.steps)
    smoke = plan_pipeline("smoke", ["launcher.threads=3", f"hydra.run.dir={tmp_path}/smoke"])
    assert smoke.max_parallel == 1 and all(s.launcher["threads"] == 3 for s in smoke.steps)

