"""The `distill` stage: `moeforge distill student=<ckpt> teachers.math=<ckpt> teachers.code=<ckpt> ...`.

On-policy distillation of several domain experts into one student (training-algorithms §7, V4 §5.1.2):
each step the student samples responses to prompts of every teacher's domain; the teacher of a prompt's
domain scores every position of the student's tokens; the loss is sum_d w_d * D(student || teacher_d) over
the full vocabulary (`distill.kind`), the teachers frozen. The student is `student` (else `init`, a
pipeline's hand-off); its model config and tokenizer come from that checkpoint. Held-out greedy scores of
the student (every `trainer.eval_every` steps) and of every teacher on every domain go to metrics.jsonl,
summary.json and report.md. Under torchrun, `distill.teacher_ranks` puts the teachers on their own ranks
(distill.remote) and the one remaining rank trains the student.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from distill.config import DistillConfig
from distill.evaluate import local_teacher_scores, teacher_scores
from distill.prompts import domain_tasks
from distill.remote import TIMEOUT_S, Placement, TeacherRanks, placement, serve, stop_teachers
from distill.report import PLOT_FILE, domain_metrics, headline, kl_curve, write_report
from distill.teacher import Teacher, model_config_of
from distill.trainer import DistillTrainer
from model.errors import ConfigError
from train.checkpoint import MANIFEST
from train.config import validate
from train.metrics import METRICS_FILE, MetricsLogger, read_jsonl
from train.parallel.env import detect_env, init_distributed
from train.precision import resolve_device, resolve_precision
from train.sft import section
from train.summary import hydra_run_dir, write_summary

log = logging.getLogger(__name__)


def _checkpoint_path(value: Any, key: str) -> Path:
    path = Path(str(value))
    if not (path / MANIFEST).is_file():
        raise ConfigError(key, f"checkpoint {path} does not exist (no {MANIFEST} in it)")
    return path


def resolve_inputs(cfg: DictConfig) -> tuple[Path, dict[str, Path]]:
    """(student checkpoint, {domain: teacher checkpoint}) from `student` (else `init`) and `teachers.*`."""
    student = cfg.get("student") or cfg.get("init")
    if not student:
        raise ConfigError("student", "name the student checkpoint: student=<ckpt> (or init=<ckpt>)")
    teachers = {str(k): v for k, v in (cfg.get("teachers") or {}).items() if v is not None}
    if not teachers:
        raise ConfigError("teachers", "name at least one teacher: teachers.<domain>=<ckpt>")
    return (_checkpoint_path(student, "student"),
            {k: _checkpoint_path(v, f"teachers.{k}") for k, v in sorted(teachers.items())})


def student_config(cfg: DictConfig, student: Path) -> DictConfig:
    """The run's config with `init` = the student and `model` = the student checkpoint's model config."""
    saved = OmegaConf.create(model_config_of(student, "student").to_dict())
    differs = [k for k in saved if k in cfg.model and cfg.model[k] != saved[k]]
    if differs:
        log.info("model.* taken from the student checkpoint %s (differs from the command line in %s)",
                 student, ", ".join(map(str, differs)))
    cfg = cfg.copy()
    cfg.init, cfg.model = str(student), saved
    return cfg


def check_teachers(teachers: dict[str, Teacher], student_hash: str | None, vocab: int) -> None:
    """Teachers must share the student's vocabulary and tokenizer."""
    for name, t in teachers.items():
        if t.vocab_size != vocab:
            raise ConfigError(f"teachers.{name}", f"vocab_size {t.vocab_size} differs from the student's "
                                                  f"{vocab}")
        if None not in (t.tokenizer_hash, student_hash) and t.tokenizer_hash != student_hash:
            raise ConfigError(f"teachers.{name}", f"{t.path} was trained with another tokenizer than the "
                                                  "student's")


@dataclass
class Inputs:
    """The validated run: config (model = the student's), distill section, checkpoints, tokenizer."""

    cfg: DictConfig
    dcfg: DistillConfig
    student: Path
    teachers: dict[str, Path]
    tokenizer: Any

    def load_teachers(self, domains: list[str], device: torch.device) -> dict[str, Teacher]:
        """The frozen teachers of `domains` on `device`, checked against the student."""
        from data.tokenizer import tokenizer_hash

        precision = resolve_precision(self.cfg.precision.name, device)
        teachers = {d: Teacher(d, self.teachers[d], device, precision) for d in domains}
        check_teachers(teachers, tokenizer_hash(self.tokenizer), int(self.cfg.model.vocab_size))
        return teachers


def prepare(cfg: DictConfig) -> Inputs:
    """Validate the config and resolve the student, the teachers and the tokenizer."""
    from data.tokenizer import load_tokenizer

    cfg = validate(cfg)
    dcfg = section(cfg, "distill", DistillConfig)
    student, teacher_paths = resolve_inputs(cfg)
    for key, per_domain in (("weights", dcfg.weights), ("domain_prompts", dcfg.domain_prompts)):
        for name in per_domain:
            if name not in teacher_paths:
                raise ConfigError(f"distill.{key}.{name}", f"no teacher for domain {name!r} "
                                                           f"(teachers: {', '.join(teacher_paths)})")
    cfg = student_config(cfg, student)
    if not (student / "tokenizer.json").is_file():
        raise ConfigError("student", f"checkpoint {student} has no tokenizer.json")
    return Inputs(cfg, dcfg, student, teacher_paths, load_tokenizer(student))


def teacher_device(inp: Inputs) -> torch.device:
    """`distill.teacher_device` (same: the student's device); a bare `cuda` is this process's GPU."""
    name = inp.dcfg.teacher_device
    device = resolve_device(inp.cfg.trainer.device if name == "same" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build(cfg: DictConfig, run_dir: Path, plan: Placement | None = None) -> DistillTrainer:
    """Validate the config, load the frozen teachers (or, with a `plan`, reach them on their ranks) and
    build the trainer (student not loaded yet: `start()` resumes the run or loads the student)."""
    inp = prepare(cfg)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    link = TeacherRanks(plan, inp.teachers, int(inp.cfg.model.vocab_size)) if plan else None
    teachers = link.teachers if link else inp.load_teachers(sorted(inp.teachers), teacher_device(inp))
    return DistillTrainer(inp.cfg, Path(run_dir), inp.dcfg, teachers, inp.tokenizer, link)


def start_ranks(cfg: DictConfig) -> tuple[Placement | None, bool]:
    """The rank layout of `distill.teacher_ranks` (None: one process, teachers local) and whether this
    call started the process group."""
    teacher_ranks = section(validate(cfg), "distill", DistillConfig).teacher_ranks
    denv = detect_env()
    if denv.world == 1 and not teacher_ranks:
        return None, False
    started = not dist.is_initialized() and denv.world > 1
    if started:
        init_distributed(resolve_device(cfg.trainer.device).type, timeout_s=TIMEOUT_S)
    domains = sorted(str(k) for k, v in (cfg.get("teachers") or {}).items() if v is not None)
    return placement(teacher_ranks, domains, denv.rank, denv.world), started


def serve_teachers(cfg: DictConfig, plan: Placement) -> dict:
    """A teacher rank: load this rank's teachers, answer the student rank until it stops."""
    inp = prepare(cfg)
    teachers = inp.load_teachers(plan.domains_of(plan.rank), teacher_device(inp))
    val = {d: domain_tasks(inp.dcfg, d, "val") for d in inp.teachers}
    log.info("teacher rank %d: %s for the student on rank %d", plan.rank, ", ".join(teachers), plan.student)
    served = serve(plan, teachers, inp.dcfg.loss_config(),
                   lambda: local_teacher_scores(teachers, inp.tokenizer, val, inp.dcfg))
    return {"stage": "distill", "role": "teacher", "rank": plan.rank, "checkpoint": None,
            "teachers": {d: str(inp.teachers[d]) for d in teachers}, "metrics": {"requests": served}}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Distil `teachers.*` into `student` for `trainer.max_steps` steps (resuming per `resume`); write
    checkpoints, metrics.jsonl, teacher_scores.json, report.md, kl_curve.png and summary.json. Under
    torchrun with `distill.teacher_ranks`, those ranks host the teachers and the other one trains."""
    plan, started = start_ranks(cfg)
    try:
        if plan is not None and not plan.is_student:
            return serve_teachers(cfg, plan)
        try:
            return train_student(cfg, Path(run_dir), plan)
        finally:
            if plan is not None:
                stop_teachers(plan)
    finally:
        if started:
            dist.destroy_process_group()


def train_student(cfg: DictConfig, run_dir: Path, plan: Placement | None) -> dict:
    """The student's side of `run`."""
    started = time.perf_counter()
    trainer = build(cfg, run_dir, plan)
    cfg, dcfg, teachers, tok = trainer.cfg, trainer.dcfg, trainer.teachers, trainer.tokenizer
    teacher_paths = {n: t.path for n, t in teachers.items()}
    student = Path(str(cfg.init))
    trainer.start()
    compute = trainer.link.scores if trainer.link else (
        lambda: local_teacher_scores(teachers, tok, trainer.val, dcfg))
    matrix = teacher_scores(teacher_paths, trainer.val, dcfg, run_dir, compute)
    metrics = MetricsLogger(run_dir, cfg.logger, total_steps=trainer.t.max_steps, start_step=trainer.step,
                            config=OmegaConf.to_container(cfg, resolve=True),
                            console_every=trainer.t.log_every)
    try:
        trainer.fit(metrics, {f"teacher_score/{d}": matrix[d][d] for d in teachers})
    finally:
        metrics.close()
    if trainer.last_checkpoint is None:
        trainer.save()
    records = read_jsonl(run_dir / METRICS_FILE)
    domains = domain_metrics(records, {n: str(p) for n, p in teacher_paths.items()},
                             {n: dcfg.weight(n) for n in teachers}, matrix,
                             {d: len(tasks) for d, tasks in trainer.val.items()})
    report = write_report(run_dir, domains, trainer.step, dcfg.kind)
    plot = kl_curve(records, sorted(teachers), run_dir / PLOT_FILE)
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    summary = {
        "stage": "distill",
        "student": str(student),
        "teachers": {n: str(p) for n, p in teacher_paths.items()},
        "checkpoint": str(trainer.last_checkpoint),
        "metrics": {**headline(domains), "steps": trainer.step, "kind": dcfg.kind,
                    "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
                    "domains": domains, "wall_s": time.perf_counter() - started},
        "report": str(report),
        "plot": str(plot),
        "run_dir": str(run_dir),
    }
    return write_summary(run_dir, summary, headline={d: {k: m[k] for k in ("teacher_score", "student_score")}
                                                     for d, m in domains.items()})


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (defined here: Hydra names the job and its log after this file)."""
    run(cfg, hydra_run_dir())


if __name__ == "__main__":
    main()
