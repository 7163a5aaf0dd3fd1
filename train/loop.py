"""The training loop shared by the pre-training and SFT stages.

One step: `grad_accum` micro-batches of forward (loss = CE + mtp_weight x MTP CE + balance loss + indexer
loss) and backward, gradient clipping, the spike guard's verdict, the optimizer step, the routing-bias
update from the step's summed expert loads, then metrics, validation and checkpoints. Resume is exact:
weights, optimizer state, data position, RNG states and guard state all come back from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model import ModelConfig, Transformer
from model.errors import ConfigError, MoeforgeError
from optim import OptimConfig, RoutingBiasUpdater, build_optimizer, build_schedule
from train import checkpoint, rng
from train.compile import compile_model
from train.config import to_object
from train.flops import FlopModel, doc_lengths, peak_flops
from train.guard import SpikeGuard, Verdict
from train.losses import IGNORE, cross_entropy, label_counts, lm_and_mtp_loss
from train.metrics import METRICS_FILE, MetricsLogger, read_jsonl
from train.precision import apply_fp8, autocast, resolve_device, resolve_precision
from train.recompute import enable_activation_checkpointing
from train.step_profile import StepProfiler

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def expert_balance(loads_LE: torch.Tensor) -> list[float]:
    """Per learned-routing layer: max expert load / mean expert load (1.0 = perfectly balanced)."""
    loads = loads_LE.float()
    return (loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)).tolist()


class Trainer:
    """Owns model, optimizer, schedule, data and run state; `fit()` trains to `trainer.max_steps`.

    `data` supplies `.train` (a loader with `next_batch()`, `state_dict()`, `load_state_dict()`), `.val`
    (with `eval_batches(n)`, or None) and `.tokenizer` (a `tokenizers.Tokenizer`, or None).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, data_builder: Callable[[Trainer], object]):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and type(self) is Trainer:  # train.parallel hook
            raise MoeforgeError("this Trainer runs one process; several (torchrun, parallel.*) need "
                                "train.parallel.trainer.ParallelTrainer")
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.t = to_object(cfg, "trainer")
        self.device = resolve_device(self.t.device)
        self.precision = resolve_precision(cfg.precision.name, self.device)
        rng.seed_all(self.t.seed)
        self.model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        self.model = Transformer(self.model_cfg).to(self.build_device())
        self.model = compile_model(apply_fp8(self.model, self.precision), self.t.compile)
        if self.t.activation_checkpointing:
            enable_activation_checkpointing(self.model.layers)
        self._check_attention_phase()
        self.data = data_builder(self)
        optim_cfg = OptimConfig.from_dict(cfg.optim)
        self.optimizer, _ = build_optimizer(self.model, optim_cfg)
        self.schedule = build_schedule(optim_cfg, self.t.max_steps)
        self.bias_updater = RoutingBiasUpdater(self.model, optim_cfg.bias_update_speed)
        s = self.t.spike
        self.guard = SpikeGuard(s.factor, s.ema_beta, s.warmup_steps, s.max_bad_steps, s.enabled)
        self.flops = FlopModel(self.model_cfg)
        self.peak = peak_flops(self.device, self.precision, self.t.peak_tflops)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.step, self.rollbacks, self.last_checkpoint = 0, 0, None
        self.tokenizer_json = self.data.tokenizer.to_str() if getattr(self.data, "tokenizer", None) else None

    def build_device(self) -> torch.device:
        """Where the whole model is built (an engine that partitions it from the host builds it there)."""
        return self.device

    # ------------------------------------------------------------------ start: resume, init or fresh
    def start(self) -> None:
        """resume=auto: newest complete checkpoint in the run, else `init` weights, else fresh."""
        resume = str(self.cfg.resume)
        path = None
        if resume == "auto":
            path = checkpoint.find_latest(self.ckpt_root)
        elif resume != "never":
            path = Path(resume)
        if path is not None:
            self.restore(path)
            log.info("resumed from %s at step %d", path, self.step)
        elif self.cfg.get("init"):
            checkpoint.load(Path(self.cfg.init), self.model)
            log.info("initialised weights from %s", self.cfg.init)

    def restore(self, path: Path, keep_data_position: bool = False) -> None:
        ck = checkpoint.load(path, self.model, self.optimizer)
        if self.tokenizer_json is not None and ck.tokenizer_hash not in (None, self._tokenizer_hash()):
            raise MoeforgeError(f"{path}: written with another tokenizer (hash {ck.tokenizer_hash}, this run "
                                f"{self._tokenizer_hash()}); check data.tokenizer and data.source")
        position = self.data.train.state_dict()
        self.data.train.load_state_dict(position if keep_data_position else ck.state["data"])
        self.guard.load_state_dict(ck.state["guard"])
        self.rollbacks = ck.state.get("rollbacks", 0)
        rng.restore(ck.rng)
        self.step, self.last_checkpoint = ck.step, path

    def _tokenizer_hash(self) -> str | None:
        from data.tokenizer import tokenizer_hash

        return tokenizer_hash(self.data.tokenizer) if self.tokenizer_json is not None else None

    def save(self) -> Path:
        state = {"data": self.data.train.state_dict(), "guard": self.guard.state_dict(),
                 "rollbacks": self.rollbacks}
        extra = {"tokenizer.json": self.tokenizer_json} if self.tokenizer_json else None
        path = checkpoint.save(self.ckpt_root, self.step, self.model, self.optimizer, state=state,
                               config=OmegaConf.to_container(self.cfg, resolve=True),
                               tokenizer_hash=self._tokenizer_hash(), keep=self.cfg.checkpoint.keep,
                               extra_files=extra)
        self.last_checkpoint = path
        return path

    # ------------------------------------------------------------------ one step
    def _check_attention_phase(self) -> None:
        if self.t.sparse_from_step > 0 and not hasattr(self.model, "set_sparse_attention"):
            raise ConfigError("trainer.sparse_from_step", "this model has no dense-attention phase "
                              "(Transformer.set_sparse_attention); leave it at 0")

    def _attention_phase(self, step: int) -> bool:
        """Sparse attention from `sparse_from_step`; dense before it (when the model has both)."""
        sparse = step >= self.t.sparse_from_step
        if hasattr(self.model, "set_sparse_attention"):
            warm = step >= self.t.sparse_from_step - self.t.indexer_warmup_steps
            self.model.set_sparse_attention(sparse, train_indexer=warm)
        return sparse

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def micro_step(self, batch: Batch, mtp_weight: float, counts: list[int]) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch. CE sums are divided by the whole step's target counts
        and per-batch means by `grad_accum`, so accumulation equals one batch of the summed size."""
        with autocast(self.precision, self.device):
            out = self.model(batch["input_ids"], batch["doc_ids"])
        lm, mtp = lm_and_mtp_loss(out.logits, out.mtp_logits, batch["labels"], batch["doc_ids"], counts)
        n = self.t.grad_accum
        parts = {"loss": lm, "mtp_loss": mtp,
                 "balance_loss": out.balance_loss / n if out.balance_loss is not None else None,
                 "indexer_loss": out.indexer_loss / n if out.indexer_loss is not None else None}
        weights = {"mtp_loss": mtp_weight, "balance_loss": 1.0, "indexer_loss": 1.0}
        total = lm + sum(w * parts[k] for k, w in weights.items() if parts[k] is not None)
        total.backward()
        found = {k: v.detach().float() for k, v in parts.items() if v is not None}
        if out.expert_loads is not None:
            found["expert_loads"] = out.expert_loads.detach().float()
        return found

    def accumulate(self, batches: list[Batch], mtp_weight: float) -> dict[str, torch.Tensor]:
        """Forward and backward of a step's micro-batches (gradients add up in `.grad`); summed metrics."""
        depths = self.model_cfg.num_nextn_predict_layers
        counts = [sum(c) for c in zip(*(label_counts(b["labels"], b["doc_ids"], depths) for b in batches))]
        sums: dict[str, torch.Tensor] = {}
        for batch in batches:
            for k, v in self.micro_step(self._to_device(batch), mtp_weight, counts).items():
                sums[k] = sums[k] + v if k in sums else v
        return sums

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (0 = off); returns the norm before clipping. (train.parallel hook: its
        ParallelTrainer overrides this with the norm over every rank.)"""
        params = [p for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def train_step(self) -> dict:
        """Take step `self.step + 1`; return its metrics record."""
        t, step = self.t, self.step
        started = time.perf_counter()
        self.optimizer.set_lr_factor(self.schedule.factor(step))
        mtp_weight = t.mtp_weight_decay_phase if self.schedule.in_decay(step) else t.mtp_weight
        sparse = self._attention_phase(step)
        self.model.train()
        batches = [self.data.train.next_batch() for _ in range(t.grad_accum)]
        lengths = [n for b in batches for n in doc_lengths(b["doc_ids"])]
        sums = self.accumulate(batches, mtp_weight)
        grad_norm = self.clip_gradients(t.grad_clip)
        loss, grad_norm = sums["loss"].item(), grad_norm.item()
        verdict = self.guard.check(loss, grad_norm)
        if verdict is Verdict.OK:
            self.optimizer.step()
            if "expert_loads" in sums:
                self.bias_updater.update(sums["expert_loads"])
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        record = {"step": self.step, "loss": loss, "lr": self.schedule.lr_at(step), "grad_norm": grad_norm,
                  "tokens_per_s": sum(lengths) / elapsed, "step_time_s": elapsed, "mtp_weight": mtp_weight,
                  "sparse_attention": sparse}
        flops = self.flops.step_flops(lengths, sparse)
        record["tflops_per_s"] = flops / elapsed / 1e12
        record["mfu"] = flops / elapsed / self.peak if self.peak else None
        if self.device.type == "cuda":  # this rank's peak since the run started (weights, state, activations)
            record["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for k in ("mtp_loss", "balance_loss", "indexer_loss"):
            if k in sums:
                record[k] = sums[k].item()
        if "expert_loads" in sums:
            balance = expert_balance(sums["expert_loads"])
            record.update(expert_balance=balance, expert_balance_max=max(balance))
        if verdict is not Verdict.OK:
            record["skipped"] = verdict.value
        if verdict is Verdict.ROLLBACK:
            record["rolled_back_to"] = self.rollback()
        return record

    def rollback(self) -> int:
        """Reload the newest checkpoint but keep reading data from here on (the bad batches are skipped)."""
        self.rollbacks += 1
        path = checkpoint.find_latest(self.ckpt_root)
        if path is None or self.rollbacks > self.t.spike.max_rollbacks:
            why = "no checkpoint to roll back to" if path is None else f"{self.rollbacks - 1} rollbacks done"
            raise MoeforgeError(f"training diverged at step {self.step} ({self.t.spike.max_bad_steps} bad "
                                f"steps in a row) and {why}; lower optim.lr or adjust trainer.spike.*")
        rollbacks = self.rollbacks
        self.restore(path, keep_data_position=True)
        self.rollbacks = rollbacks
        log.warning("rolled back to %s after %d bad steps", path, self.t.spike.max_bad_steps)
        return self.step

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted next-token CE over `trainer.eval_batches` val batches (None: no val split)."""
        if getattr(self.data, "val", None) is None:
            return None
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for batch in self.data.val.eval_batches(self.t.eval_batches):
            batch = self._to_device(batch)
            with autocast(self.precision, self.device):
                out = self.model(batch["input_ids"], batch["doc_ids"], with_mtp=False)
            n = int((batch["labels"] != IGNORE).sum())
            total += cross_entropy(out.logits, batch["labels"]) * n
            count += n
        self.model.train()
        return (total / max(count, 1)).item()

    def eval_metrics(self) -> dict:
        """What a validation point records (stages with other held-out measures override this)."""
        return {"val_loss": self.evaluate()}

    # ------------------------------------------------------------------ the run
    def fit(self, metrics: MetricsLogger, first: dict | None = None) -> None:
        """Train to `trainer.max_steps`: validate every `eval_every` steps and at the end, checkpoint every
        `checkpoint.every` steps and at the end. A fresh run first records step 0 (`first` + validation)."""
        t, every = self.t, self.cfg.checkpoint.every
        if self.step == 0:
            metrics.log({"step": 0, **(first or {}), **self.eval_metrics()}, advance=False)
        profiler = StepProfiler(t.profile, self.run_dir, self.device)
        while self.step < t.max_steps:
            with profiler.step(self.step + 1):
                record = self.train_step()
            if "rolled_back_to" in record:
                metrics.rewind(self.step)
                continue
            done = self.step == t.max_steps
            if done or (t.eval_every and self.step % t.eval_every == 0):
                record.update(self.eval_metrics())
            metrics.log(record)
            if done or (every and self.step % every == 0):
                self.save()
        profiler.finish()

    def train(self, first: dict | None = None) -> list[dict]:
        """The whole stage's training: `start` (resume / init / fresh), `fit` with metrics to the run
        directory, a final checkpoint if the run has none; returns the run's metric records."""
        self.start()
        metrics = MetricsLogger(self.run_dir, self.cfg.logger, total_steps=self.t.max_steps,
                                start_step=self.step, config=OmegaConf.to_container(self.cfg, resolve=True),
                                console_every=self.t.log_every)
        try:
            self.fit(metrics, first)
        finally:
            metrics.close()
        if self.last_checkpoint is None:
            self.save()
        return read_jsonl(self.run_dir / METRICS_FILE)
