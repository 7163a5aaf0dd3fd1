"""The `distill` stage: `moeforge distill student=<ckpt> teachers.math=<ckpt> teachers.code=<ckpt> ...`.

On-policy distillation of several domain experts into one student (training-algorithms §7, V4 §5.1.2):
each step the student samples responses to prompts of every teacher's domain; the teacher of a prompt's
domain scores every position of the student's tokens; the loss is sum_d w_d * D(student || teacher_d) over
the full vocabulary (`distill.kind`), the teachers frozen. The student is `student` (else `init`, a
pipeline's hand-off); its model config and tokenizer come from that checkpoint. Held-out greedy scores of
the student (every `trainer.eval_every` steps) and of every teacher on every domain go to metrics.jsonl,
summary.json and report.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from distill.config import DistillConfig
from distill.evaluate import check_cache_support, domain_scores, teacher_scores
from distill.objective import distill_objective, gather_positions, response_positions
from distill.prompts import PromptSampler, domain_tasks
from distill.report import PLOT_FILE, domain_metrics, headline, kl_curve, write_report
from distill.teacher import Teacher, model_config_of
from model.errors import ConfigError
from rl.rollout import Rollout, SamplingConfig, generate, task_prompt
from train.checkpoint import MANIFEST
from train.config import validate
from train.guard import Verdict
from train.loop import Trainer
from train.metrics import METRICS_FILE, MetricsLogger, read_jsonl
from train.precision import autocast, resolve_device, resolve_precision
from train.sft import section

log = logging.getLogger(__name__)


@dataclass
class DistillData:
    tokenizer: Any
    train: PromptSampler
    val: None = None


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


def check_teachers(teachers: dict[str, Teacher], student_hash: str | None, vocab: int, dcfg: DistillConfig):
    """Teachers must share the student's vocabulary and tokenizer; weights may only name teachers."""
    for name, t in teachers.items():
        if t.vocab_size != vocab:
            raise ConfigError(f"teachers.{name}", f"vocab_size {t.vocab_size} differs from the student's "
                                                  f"{vocab}")
        if None not in (t.tokenizer_hash, student_hash) and t.tokenizer_hash != student_hash:
            raise ConfigError(f"teachers.{name}", f"{t.path} was trained with another tokenizer than the "
                                                  "student's")
    for name in dcfg.weights:
        if name not in teachers:
            raise ConfigError(f"distill.weights.{name}", f"no teacher for domain {name!r} "
                                                         f"(teachers: {', '.join(teachers)})")


class DistillTrainer(Trainer):
    """The shared trainer (model, optimizer, schedule, guard, checkpoints, resume), distillation steps."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dcfg: DistillConfig, teachers: dict[str, Teacher],
                 tokenizer):
        self.dcfg, self.teachers, self.tokenizer = dcfg, teachers, tokenizer
        super().__init__(cfg, run_dir, DistillTrainer._build_data)
        check_cache_support(self.model, dcfg)
        self.val = {d: domain_tasks(dcfg, d, "val") for d in teachers}

    def _build_data(self) -> DistillData:
        pools = {d: domain_tasks(self.dcfg, d, "train") for d in self.teachers}
        return DistillData(self.tokenizer, PromptSampler(pools, self.dcfg.prompts_per_domain, self.t.seed))

    # ------------------------------------------------------------------ sampling
    def sample(self, tasks: list[dict], step: int) -> Rollout:
        """`samples_per_prompt` responses of the student (never a teacher) to each task, seeded by step."""
        d = self.dcfg
        prompts = [task_prompt(t, self.tokenizer, d.system) for t in tasks
                   for _ in range(d.samples_per_prompt)]
        cfg = SamplingConfig(max_new_tokens=d.max_new_tokens, temperature=d.sample_temperature, top_p=d.top_p,
                             use_cache=d.use_cache)
        gen = torch.Generator(device=self.device).manual_seed(self.t.seed * 1_000_003 + step)
        return generate(self.model, prompts, cfg, gen)

    # ------------------------------------------------------------------ one step
    def _micro(self, sub: Rollout, teacher: Teacher, share: float, aux_share: float) -> dict:
        ids, plen = sub.sequences()
        inp = ids[:, :-1]
        pos = response_positions(plen, sub.tokens.shape[1], inp.shape[1])
        with autocast(self.precision, self.device):
            out = self.model(inp, with_mtp=False)
        s_logits = gather_positions(out.logits, pos)
        t_hidden = gather_positions(teacher.hidden(inp), pos)
        loss, m = distill_objective(s_logits, t_hidden, teacher.head, sub.tokens, sub.mask, self.dcfg)
        total = share * loss
        for aux in (out.balance_loss, out.indexer_loss):
            if aux is not None:
                total = total + aux_share * aux
        total.backward()
        found = {"loss": share * loss.detach(), "kl": m["kl"] * sub.mask.sum()}
        if out.expert_loads is not None:
            found["expert_loads"] = out.expert_loads.detach().float()
        return found

    def _domain(self, roll: Rollout, rows: list[int], teacher: Teacher, n_rows: int) -> dict:
        """Forward/backward of one domain's rows in micro-batches; the shares add up to its reduction."""
        group = roll.select(torch.tensor(rows, device=roll.tokens.device))
        by_token = self.dcfg.reduction == "token"
        denom = float(group.mask.sum().clamp(min=1)) if by_token else float(len(rows))
        sums: dict[str, torch.Tensor] = {}
        for i in range(0, len(rows), self.dcfg.micro_batch):
            idx = torch.arange(i, min(i + self.dcfg.micro_batch, len(rows)), device=roll.tokens.device)
            sub = group.select(idx)
            size = float(sub.mask.sum()) if by_token else float(len(idx))
            w = self.dcfg.weight(teacher.name)
            for k, v in self._micro(sub, teacher, w * size / denom, len(idx) / n_rows).items():
                sums[k] = sums[k] + v if k in sums else v
        sums["kl"] = sums["kl"] / group.mask.sum().clamp(min=1)
        sums["length"] = group.lengths.float().mean()
        return sums

    def backward(self, roll: Rollout, domains: list[str]) -> tuple[float, dict, torch.Tensor | None]:
        """Gradients of sum_d w_d * loss_d into the student (one teacher at a time); (loss, per-domain
        metrics, summed expert loads)."""
        self.model.train()
        record: dict[str, float] = {}
        loss, loads = 0.0, None
        for name, teacher in self.teachers.items():
            rows = [i for i, d in enumerate(domains) if d == name]
            if not rows:
                continue
            sums = self._domain(roll, rows, teacher, len(domains))
            loss += float(sums["loss"])
            record[f"kl/{name}"], record[f"length/{name}"] = float(sums["kl"]), float(sums["length"])
            if "expert_loads" in sums:
                loads = sums["expert_loads"] if loads is None else loads + sums["expert_loads"]
        return loss, record, loads

    def train_step(self) -> dict:
        """Sample, distil every domain's rows against its teacher, step; return the step's record."""
        t, step = self.t, self.step
        started = time.perf_counter()
        self.optimizer.set_lr_factor(self.schedule.factor(step))
        self._attention_phase(step)
        tasks = self.data.train.next_batch()
        roll = self.sample(tasks, step)
        sampled = time.perf_counter()
        domains = [task["domain"] for task in tasks for _ in range(self.dcfg.samples_per_prompt)]
        loss, parts, loads = self.backward(roll, domains)
        record: dict[str, Any] = {"step": step + 1, **parts}
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        verdict = self.guard.check(loss, grad_norm)
        if verdict is Verdict.OK:
            self.optimizer.step()
            if loads is not None:
                self.bias_updater.update(loads)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        record.update(loss=loss, lr=self.schedule.lr_at(step), grad_norm=grad_norm, step_time_s=elapsed,
                      sample_time_s=sampled - started, tokens_per_s=float(roll.mask.sum()) / elapsed)
        if verdict is not Verdict.OK:
            record["skipped"] = verdict.value
        if verdict is Verdict.ROLLBACK:
            record["rolled_back_to"] = self.rollback()
        return record

    # ------------------------------------------------------------------ evaluation and the run
    def scores(self) -> dict:
        """The student's held-out accuracy and format rate per domain."""
        out = {}
        for d, r in domain_scores(self.model, self.tokenizer, self.val, self.dcfg).items():
            out[f"student_score/{d}"], out[f"student_format/{d}"] = r["accuracy"], r["format_rate"]
        return out

    def fit(self, metrics: MetricsLogger, first: dict | None = None) -> None:
        t, every = self.t, self.cfg.checkpoint.every
        if self.step == 0:
            metrics.log({"step": 0, **(first or {}), **self.scores()}, advance=False)
        while self.step < t.max_steps:
            record = self.train_step()
            if "rolled_back_to" in record:
                metrics.rewind(self.step)
                continue
            done = self.step == t.max_steps
            if done or (t.eval_every and self.step % t.eval_every == 0):
                record.update(self.scores())
            metrics.log(record)
            if done or (every and self.step % every == 0):
                self.save()


def build(cfg: DictConfig, run_dir: Path) -> DistillTrainer:
    """Validate the config, load the frozen teachers and build the trainer (student not loaded yet:
    `start()` resumes the run or loads the student)."""
    from data.tokenizer import load_tokenizer, tokenizer_hash

    cfg = validate(cfg)
    dcfg = section(cfg, "distill", DistillConfig)
    student, teacher_paths = resolve_inputs(cfg)
    cfg = student_config(cfg, student)
    if not (student / "tokenizer.json").is_file():
        raise ConfigError("student", f"checkpoint {student} has no tokenizer.json")
    tok = load_tokenizer(student)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.trainer.device)
    t_device = device if dcfg.teacher_device == "same" else resolve_device(dcfg.teacher_device)
    precision = resolve_precision(cfg.precision.name, t_device)
    teachers = {n: Teacher(n, p, t_device, precision) for n, p in teacher_paths.items()}
    check_teachers(teachers, tokenizer_hash(tok), int(cfg.model.vocab_size), dcfg)
    return DistillTrainer(cfg, Path(run_dir), dcfg, teachers, tok)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Distil `teachers.*` into `student` for `trainer.max_steps` steps (resuming per `resume`); write
    checkpoints, metrics.jsonl, teacher_scores.json, report.md, kl_curve.png and summary.json."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    trainer = build(cfg, run_dir)
    cfg, dcfg, teachers, tok = trainer.cfg, trainer.dcfg, trainer.teachers, trainer.tokenizer
    teacher_paths = {n: t.path for n, t in teachers.items()}
    student = Path(str(cfg.init))
    trainer.start()
    matrix = teacher_scores(teachers, tok, trainer.val, dcfg, run_dir)
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
                             {n: dcfg.weight(n) for n in teachers}, matrix)
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
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("distill done: %s", json.dumps({d: {k: m[k] for k in ("teacher_score", "student_score")}
                                             for d, m in domains.items()}))
    return summary


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point; the run directory is `hydra.run.dir`."""
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
