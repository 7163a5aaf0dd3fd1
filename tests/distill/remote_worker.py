"""torchrun worker of test_remote.py (gloo, CPU): rank 0 trains the student, rank 1 hosts both teachers.

1. The whole stage (`distill.stage.run`) for a few steps with `distill.teacher_ranks=[1]`.
2. Per loss kind, one distillation backward of the student on its own samples, teachers remote; the
   rollout, loss, metrics and gradients go to `<out>/<kind>.pt` for the single-process comparison.
Each rank writes what its runs returned to `<out>/rank<r>.json`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill_helpers import compose, student_grads  # noqa: E402

from distill.remote import stop_teachers  # noqa: E402
from distill.stage import build, run, serve_teachers, start_ranks  # noqa: E402
from train.parallel.env import init_distributed  # noqa: E402


def backward_on_own_samples(cfg, rd, kind: str, out: Path) -> dict:
    plan, _ = start_ranks(cfg)
    if not plan.is_student:
        return serve_teachers(cfg, plan)
    try:
        trainer = build(cfg, rd, plan)
        trainer.start()
        tasks = trainer.data.train.next_batch()
        roll = trainer.sample(tasks, 0)
        domains = [t["domain"] for t in tasks]
        loss, parts, grads = student_grads(trainer, roll, domains)
    finally:
        stop_teachers(plan)
    torch.save({"roll": roll, "domains": domains, "loss": loss, "parts": parts, "grads": grads},
               out / f"{kind}.pt")
    return {"loss": loss}


def main(out: Path, spec: dict) -> None:
    torch.set_num_threads(1)
    rank = init_distributed("cpu").rank
    results = {"run": run(*compose("distill", spec["run_dir"], *spec["run"]))}
    for kind in spec["kinds"]:
        cfg, rd = compose("distill", spec["grad_dir"], *spec["grads"], f"distill.kind={kind}")
        results[kind] = backward_on_own_samples(cfg, rd, kind, out)
    (out / f"rank{rank}.json").write_text(json.dumps(results, default=str))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
