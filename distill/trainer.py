"""The distillation trainer: the shared `train.loop.Trainer` (model, optimizer, schedule, spike guard,
checkpoints, exact resume) whose step samples from the student and distils each domain's rows against that
domain's frozen teacher, and whose evaluation is the student's held-out score per domain."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from distill.config import DistillConfig
from distill.evaluate import check_cache_support, domain_scores
from distill.objective import distill_objective, gather_positions, response_positions
from distill.prompts import PromptSampler, domain_tasks
from distill.remote import TeacherRanks
from distill.teacher import Teacher
from optim import RoutingBiasUpdater
from rl.rollout import Rollout, SamplingConfig, generate, task_prompt
from train.guard import Verdict
from train.loop import Trainer
from train.precision import autocast


@dataclass
class DistillData:
    tokenizer: Any
    train: PromptSampler
    val: None = None


class DistillTrainer(Trainer):
    """The shared trainer (model, optimizer, schedule, guard, checkpoints, resume), distillation steps."""

    def __init__(self, cfg: DictConfig, run_dir: Path, dcfg: DistillConfig, teachers: dict[str, Teacher],
                 tokenizer, link: TeacherRanks | None = None):
        """`teachers`: domain -> `Teacher`, or `RemoteTeacher` with `link`, the teacher ranks' link."""
        self.dcfg, self.teachers, self.tokenizer, self.link = dcfg, teachers, tokenizer, link
        super().__init__(cfg, run_dir, DistillTrainer._build_data)
        # the student runs without its MTP block here, so a step's expert loads cover the main layers only
        self.bias_updater = RoutingBiasUpdater(self.model.layers, self.bias_updater.speed)
        check_cache_support(self.model, dcfg)
        self.val = {d: domain_tasks(dcfg, d, "val") for d in teachers}

    def _build_data(self) -> DistillData:
        pools = {d: domain_tasks(self.dcfg, d, "train") for d in self.teachers}
        return DistillData(self.tokenizer, PromptSampler(pools, {d: self.dcfg.prompts(d) for d in pools},
                                                         self.t.seed))

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
        source = teacher.source(inp, pos, self.dcfg.loss_config())  # a teacher rank starts on it now
        with autocast(self.precision, self.device):
            out = self.model(inp, with_mtp=False)
        s_logits = gather_positions(out.logits, pos)
        loss, m = distill_objective(s_logits, source, sub.tokens, sub.mask, self.dcfg)
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
    def eval_metrics(self) -> dict:
        """The student's held-out accuracy and format rate per domain."""
        out = {}
        for d, r in domain_scores(self.model, self.tokenizer, self.val, self.dcfg).items():
            out[f"student_score/{d}"], out[f"student_format/{d}"] = r["accuracy"], r["format_rate"]
        return out
