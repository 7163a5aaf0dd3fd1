"""The `grpo` stage: `moeforge grpo domain=math init=<sft checkpoint> [overrides]` or `python -m rl.grpo ...`.

Each step samples `grpo.prompts_per_step` training tasks (a function of `trainer.seed` and the step, so a
resumed run sees the same prompts), draws `grpo.group_size` responses per prompt with the rollout engine
(seeded per step), scores them with the domain's verifier, forms group advantages, drops groups whose
rewards are all equal and refills the batch with new prompts (dynamic sampling, rl.dynamic_sampling;
`sampling_rounds`, `groups_dropped`, `groups_refilled` in metrics.jsonl), and takes `grpo.epochs`
optimizer steps on the clipped-ratio loss (rl.grpo_loss) with ratios against the rollout log-probs; β > 0
adds the k3 KL to the frozen init model. Router replay makes the training passes reuse the rollout's
expert choices. Routing biases are not updated and no balance loss is added during RL. Held-out accuracy
(greedy, or with `grpo.eval_temperature` > 0 the mean over `grpo.eval_samples` seeded samples per task)
is measured before the first step and after the last (and every `trainer.eval_every` steps).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from model import ModelConfig, Transformer
from model.errors import ConfigError
from optim import OptimConfig, build_optimizer, build_schedule
from rl.config import GRPOConfig
from rl.dynamic_sampling import GroupCollector
from rl.grpo_loss import grpo_loss
from rl.rewards import score_batch
from rl.rollout import Rollout, SamplingConfig, evaluate_tasks, generate, task_prompt, token_logprobs
from train import checkpoint, rng
from train.config import to_object, validate
from train.metrics import METRICS_FILE, MetricsLogger, read_jsonl
from train.precision import autocast, resolve_device, resolve_precision
from train.sft import DomainConfig, section, stage_tokenizer
from train.summary import hydra_run_dir, write_summary

log = logging.getLogger(__name__)
PLOT_FILE = "reward_curve.png"


def step_prompts(tasks: list[dict], n: int, seed: int, step: int, round_: int = 0,
                 exclude: set[str] = frozenset()) -> list[dict]:
    """The `n` distinct training tasks of `step`'s sampling round `round_` (0, then refill rounds), none
    with an id in `exclude`; deterministic for seed, step and round."""
    key = f"grpo|{seed}|{step}" + (f"|{round_}" if round_ else "")
    pool = [t for t in tasks if t["id"] not in exclude] if exclude else tasks
    return random.Random(key).sample(pool, min(n, len(pool)))


def micro_batches(rows: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [rows[i : i + size] for i in range(0, rows.numel(), size)]


def _accumulate(sums: dict[str, float], metrics: dict, weight: float) -> None:
    """Fold one micro-batch's metrics in: extremes for *_max/*_min, weighted sums otherwise."""
    for k, v in metrics.items():
        v = float(v)
        if k.endswith("_max"):
            sums[k] = max(sums.get(k, v), v)
        elif k.endswith("_min"):
            sums[k] = min(sums.get(k, v), v)
        else:
            sums[k] = sums.get(k, 0.0) + v * weight


class GRPORun:
    """Policy, optional reference, optimizer, tasks and run state of one grpo stage."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.resume_from = self._resume_path()
        self.t = to_object(cfg, "trainer")
        self.g: GRPOConfig = section(cfg, "grpo", GRPOConfig)
        self.domain: DomainConfig = section(cfg, "domain", DomainConfig)
        self.device = resolve_device(self.t.device)
        self.precision = resolve_precision(cfg.precision.name, self.device)
        rng.seed_all(self.t.seed)
        self.model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        self.model = Transformer(self.model_cfg).to(self.device)
        self.tok = stage_tokenizer(cfg, self.model_cfg.vocab_size)
        optim = {**OmegaConf.to_container(cfg.optim, resolve=True), "warmup_steps": self.g.warmup_steps}
        if self.g.lr is not None:
            optim["lr"] = self.g.lr
        optim_cfg = OptimConfig.from_dict(optim)
        self.optimizer, _ = build_optimizer(self.model, optim_cfg)
        self.schedule = build_schedule(optim_cfg, self.t.max_steps)
        self.loss_cfg = self.g.loss_config()
        self.train_tasks, self.val_tasks = self.domain.tasks("train"), self.domain.tasks("val")
        self.step, self.before, self.last_checkpoint = 0, None, None
        self.ref = None

    # ------------------------------------------------------------------ start: resume or init
    def _resume_path(self) -> Path | None:
        resume = str(self.cfg.resume)
        path = checkpoint.find_latest(self.ckpt_root) if resume == "auto" else (
            None if resume == "never" else Path(resume))
        if path is None and not self.cfg.get("init"):
            raise ConfigError("init", "grpo starts from a checkpoint (usually the domain's SFT step): "
                                      "set init=<checkpoint dir>")
        return path

    def start(self) -> None:
        init, path = self.cfg.get("init"), self.resume_from
        if init:
            checkpoint.load(Path(str(init)), self.model)
        if self.g.beta > 0:
            self.ref = Transformer(self.model_cfg).to(self.device)
            self.ref.load_state_dict(self.model.state_dict())
            self.ref.requires_grad_(False).eval()
        if path is not None:
            ck = checkpoint.load(path, self.model, self.optimizer)
            rng.restore(ck.rng)
            self.step, self.before, self.last_checkpoint = ck.step, ck.state.get("before"), path
            log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        from data.tokenizer import tokenizer_hash

        self.last_checkpoint = checkpoint.save(
            self.ckpt_root, self.step, self.model, self.optimizer, state={"before": self.before},
            config=OmegaConf.to_container(self.cfg, resolve=True), tokenizer_hash=tokenizer_hash(self.tok),
            keep=self.cfg.checkpoint.keep, extra_files={"tokenizer.json": self.tok.to_str()})
        return self.last_checkpoint

    def evaluate(self, seed: int | None = None) -> dict:
        """Held-out accuracy (greedy, or mean over `grpo.eval_samples` sampled responses drawn with `seed`,
        default `trainer.seed`)."""
        with autocast(self.precision, self.device):
            return evaluate_tasks(self.model, self.tok, self.val_tasks, max_new_tokens=self.g.max_new_tokens,
                                  batch_size=self.g.eval_batch, system=self.domain.system,
                                  use_cache=self.g.use_cache, temperature=self.g.eval_temperature,
                                  samples=self.g.eval_samples, seed=self.t.seed if seed is None else seed)

    # ------------------------------------------------------------------ one step
    def rollout(self, tasks: list[dict], gen: torch.Generator | None = None) -> tuple[Rollout, list[dict]]:
        """`group_size` responses to each task (groups contiguous) and their scores; `gen` defaults to the
        step's generator."""
        g = self.g
        prompts = [task_prompt(t, self.tok, self.domain.system) for t in tasks for _ in range(g.group_size)]
        sampling = SamplingConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                  use_cache=g.use_cache, record_routing=g.router_replay)
        gen = gen or self.step_generator()
        with autocast(self.precision, self.device):
            roll = generate(self.model, prompts, sampling, gen)
        scores = score_batch([t for t in tasks for _ in range(g.group_size)], roll.texts(self.tok))
        return roll, scores

    def step_generator(self) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(self.t.seed * 1_000_003 + self.step)

    def rewards(self, scores: list[dict]) -> torch.Tensor:
        fmt = torch.tensor([s["format_ok"] for s in scores], dtype=torch.float32)
        return torch.tensor([s["reward"] for s in scores], dtype=torch.float32) + self.g.format_reward * fmt

    def collect(self) -> tuple[GroupCollector, dict]:
        """Roll out the step's prompts, then (dynamic sampling) refill rounds of new prompts until the batch
        has `grpo.prompts_per_step` informative groups or `grpo.max_refill_rounds` extra rounds are done.
        Returns the collector and the first round's metrics (the policy's reward on fresh prompts)."""
        g = self.g
        collector = GroupCollector(g.prompts_per_step, g.group_size, drop_equal=g.dynamic_sampling,
                                   scale_by_std=g.scale_by_std)
        gen, used, first = self.step_generator(), set(), {}
        for round_ in range(1 + (g.max_refill_rounds if g.dynamic_sampling else 0)):
            n = collector.next_round_size()
            tasks = step_prompts(self.train_tasks, n, self.t.seed, self.step, round_, used)
            if not tasks:
                break
            used.update(t["id"] for t in tasks)
            roll, scores = self.rollout(tasks, gen)
            rewards = self.rewards(scores)
            if round_ == 0:
                first = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
                         "accuracy": sum(s["correct"] for s in scores) / len(scores),
                         "format_rate": sum(s["format_ok"] for s in scores) / len(scores),
                         "response_len": roll.lengths.float().mean().item(),
                         "truncated": (~roll.stopped).float().mean().item()}
            collector.add(roll, rewards)
            if collector.full:
                break
        if not collector.full and g.dynamic_sampling:
            log.info("step %d: %d of %d informative groups after %d rounds", self.step + 1, collector.groups,
                     g.prompts_per_step, collector.rounds)
        return collector, first

    def _reference_logp(self, roll: Rollout) -> torch.Tensor | None:
        if self.ref is None:
            return None
        with torch.no_grad(), autocast(self.precision, self.device):
            return torch.cat([token_logprobs(self.ref, roll.select(i))[0]
                              for i in micro_batches(torch.arange(len(roll.prompts)), self.g.micro_batch)])

    def optimise(self, roll: Rollout, adv: torch.Tensor) -> dict:
        """`grpo.epochs` optimizer steps on the kept rows; metrics of the first epoch (pre-update)."""
        g, t = self.g, self.t
        ref_logp = self._reference_logp(roll)
        chunks = micro_batches(torch.arange(len(roll.prompts)), g.micro_batch)
        by_tokens = g.loss_agg == "token_mean"
        total = roll.mask.sum() if by_tokens else roll.mask.new_tensor(len(roll.prompts))
        first: dict[str, float] = {}
        self.model.train()
        for epoch in range(g.epochs):
            sums: dict[str, float] = {}
            for idx in chunks:
                sub = roll.select(idx)
                weight = (sub.mask.sum() if by_tokens else sub.mask.new_tensor(len(idx))) / total
                with autocast(self.precision, self.device):
                    logp, ent = token_logprobs(self.model, sub, replay=g.router_replay, entropy=True)
                ref = ref_logp[idx] if ref_logp is not None else None
                loss, m = grpo_loss(logp, sub.logp, adv[idx], sub.mask, self.loss_cfg, ref_logp_BT=ref,
                                    entropy_BT=ent)
                (loss * weight).backward()
                m["loss"] = loss.detach()
                diff = (logp.detach() - sub.logp).abs() * sub.mask
                m["logp_mismatch"] = diff.sum() / sub.mask.sum().clamp(min=1)
                m["logp_mismatch_max"] = diff.max()
                _accumulate(sums, m, float(weight))
            params = [p for p in self.model.parameters() if p.grad is not None]
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if epoch == 0:
                first = sums
        return first

    def train_step(self) -> dict:
        """One GRPO step: collect groups (rl.dynamic_sampling), then `grpo.epochs` optimizer steps.
        reward/accuracy/format/length metrics are the first round's; `kept_fraction` is the fraction of all
        sampled groups that were informative."""
        started = time.perf_counter()
        self.optimizer.set_lr_factor(self.schedule.factor(self.step))
        collector, first = self.collect()
        stats = collector.stats()
        record = {"step": self.step + 1, "lr": self.schedule.lr_at(self.step), **first, **stats,
                  "kept_fraction": 1 - stats["groups_dropped"] / stats["groups_sampled"],
                  "rollout_s": time.perf_counter() - started}
        roll, adv = collector.batch()
        if roll is not None:
            record.update(self.optimise(roll, adv.to(self.device)))
        else:
            log.info("step %d: every group has equal rewards; no update", self.step + 1)
        self.step += 1
        record["step_time_s"] = time.perf_counter() - started
        return record

    # ------------------------------------------------------------------ the run
    def fit(self, metrics: MetricsLogger) -> dict:
        t, every = self.t, self.cfg.checkpoint.every
        if self.before is None:
            self.before = self.evaluate()
            metrics.log({"step": 0, **{f"val_{k}": v for k, v in self.before.items()}}, advance=False)
        after = None
        while self.step < t.max_steps:
            record = self.train_step()
            done = self.step == t.max_steps
            if done or (t.eval_every and self.step % t.eval_every == 0):
                after = self.evaluate()
                record.update({f"val_{k}": v for k, v in after.items()})
            metrics.log(record)
            if done or (every and self.step % every == 0):
                self.save()
        return after or self.evaluate()


def reward_curve(metrics_path: Path, out_png: Path, title: str) -> Path:
    """Reward and accuracy per step, held-out accuracy where measured; return the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("reward_mean", "-"), ("accuracy", "-"), ("val_accuracy", "o-")):
        pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key, markersize=3, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """GRPO to `trainer.max_steps` from `init` (resuming per `resume`); write checkpoints, metrics.jsonl,
    the reward-curve PNG and summary.json with held-out accuracy before and after."""
    started = time.perf_counter()
    cfg = validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = GRPORun(cfg, run_dir)
    state.start()
    metrics = MetricsLogger(run_dir, cfg.logger, total_steps=state.t.max_steps, start_step=state.step,
                            config=OmegaConf.to_container(cfg, resolve=True), console_every=state.t.log_every)
    try:
        after = state.fit(metrics)
    finally:
        metrics.close()
    if state.last_checkpoint is None or not str(state.last_checkpoint).endswith(f"step-{state.step}"):
        state.save()
    title = f"grpo {state.domain.name} {run_dir.name}"
    plot = reward_curve(run_dir / METRICS_FILE, run_dir / PLOT_FILE, title)
    steps = [r for r in read_jsonl(run_dir / METRICS_FILE) if "reward_mean" in r]
    summary = {
        "stage": "grpo",
        "domain": state.domain.name,
        "checkpoint": str(state.last_checkpoint),
        "metrics": {"steps": state.step, "n_val": after["n"],
                    "accuracy_before": state.before["accuracy"], "accuracy_after": after["accuracy"],
                    "format_rate_before": state.before["format_rate"],
                    "format_rate_after": after["format_rate"],
                    "reward_first": steps[0]["reward_mean"] if steps else None,
                    "reward_last": steps[-1]["reward_mean"] if steps else None,
                    "wall_s": time.perf_counter() - started},
        "plot": str(plot),
        "run_dir": str(run_dir),
    }
    return write_summary(run_dir, summary)


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (defined here: Hydra names the job and its log after this file)."""
    run(cfg, hydra_run_dir())


if __name__ == "__main__":
    main()
