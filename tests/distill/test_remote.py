"""Teachers on their own ranks (`distill.teacher_ranks`): the rank layout and its config errors, and one
torchrun launch (student rank 0 + teacher rank 1, gloo) whose stage runs end to end and whose loss and
student gradients equal the single-process run's within 1e-5 relative."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distill_helpers import compose, distill_overrides, student_grads

from distill.evaluate import local_teacher_scores
from distill.remote import placement
from distill.stage import build
from distill.teacher import Teacher
from model.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("remote_worker.py")
KINDS = ("reverse_kl", "sampled")
STEPS = 2


def test_placement_deals_domains_to_teacher_ranks_and_names_the_key():
    plan = placement([1, 2], ["math", "code", "chem"], rank=2, world=3)
    assert plan.student == 0 and plan.teachers == {"chem": 1, "code": 2, "math": 1}
    assert plan.domains_of(2) == ["code"] and not plan.is_student and plan.teacher_ranks() == [1, 2]
    assert placement([0], ["math"], rank=1, world=2).student == 1  # the student need not be rank 0
    assert placement([], ["math"], rank=0, world=1) is None  # one process: the teachers are local
    for ranks, world in (([], 2), ([1], 1), ([2], 2), ([1], 3), ([1, 2, 3], 4)):
        with pytest.raises(ConfigError, match="distill.teacher_ranks"):
            placement(ranks, ["math", "code"], rank=0, world=world)


def torchrun(out: Path, spec: dict, timeout: float = 600) -> list[dict]:
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(port), str(WORKER), str(out), str(spec_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        log = f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{log}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


@pytest.mark.timeout(900)
def test_teachers_on_another_rank_give_the_single_process_loss_and_gradients(checkpoints, tmp_path):
    student = checkpoints.random("s-no-aux", 0, balance_loss_alpha=0.0)  # the distillation loss only
    teachers = {"math": checkpoints.random("t-math", 1), "code": checkpoints.random("t-code", 2)}
    small = ["distill.prompts_per_domain=2", "distill.max_new_tokens=6", "distill.n_val=3",
             "distill.chunk_rows=7", "distill.chunk_vocab=100"]  # several row blocks and a ragged vocab end
    base = [*distill_overrides(student, teachers), *small]
    spec = {"run_dir": str(tmp_path / "run"), "grad_dir": str(tmp_path / "grads"), "kinds": list(KINDS),
            "run": [*base, "distill.teacher_ranks=[1]", f"trainer.max_steps={STEPS}", "optim.warmup_steps=1",
                    "trainer.eval_every=0",
                    "checkpoint.every=0"],
            "grads": [*base, "distill.teacher_ranks=[1]"]}
    student_rank, teacher_rank = torchrun(tmp_path, spec)

    summary = student_rank["run"]
    assert summary["stage"] == "distill" and summary["metrics"]["steps"] == STEPS
    assert Path(summary["checkpoint"]).name == f"step-{STEPS}"
    assert teacher_rank["run"]["role"] == "teacher"
    assert teacher_rank["run"]["metrics"]["requests"] == 1 + 2 * STEPS  # scores, then each domain a step
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl/math"] > 0 and r["kl/code"] > 0 for r in records if r["step"] > 0)
    # the teacher rank's score matrix is the teachers' own, scored here in one process
    cfg, rd = compose("distill", tmp_path / "local", *base)
    trainer = build(cfg, rd)
    local = {d: Teacher(d, p, torch.device("cpu")) for d, p in teachers.items()}
    matrix = json.loads((tmp_path / "run" / "teacher_scores.json").read_text())["scores"]
    assert matrix == local_teacher_scores(local, trainer.tokenizer, trainer.val, trainer.dcfg)

    for kind in KINDS:  # the same batch of the student's own samples, teachers in this process
        remote = torch.load(tmp_path / f"{kind}.pt", weights_only=False)
        cfg, rd = compose("distill", tmp_path / "local", *base, f"distill.kind={kind}")
        trainer = build(cfg, rd)
        trainer.start()
        loss, parts, grads = student_grads(trainer, remote["roll"], remote["domains"])
        assert abs(remote["loss"] - loss) <= 1e-5 * abs(loss), kind
        assert parts["kl/math"] == pytest.approx(remote["parts"]["kl/math"], rel=1e-5)
        assert sorted(grads) == sorted(remote["grads"]) and len(grads) > 10
        worst = max(relative(remote["grads"][n], g) for n, g in grads.items())
        print(f"{kind}: loss {loss:.6g}, remote {remote['loss']:.6g}; worst gradient rel. error {worst:.1e}")
        assert worst < 1e-5, (kind, worst)
