"""`ParallelTrainer`: the training loop (`train.loop.Trainer`) on a device mesh.

Same steps, metrics, guard and schedule as `Trainer`; what changes: the layout is validated before any
process group starts, the process group comes from torchrun/srun (a group of one otherwise), the model is
split by `parallelize`, the optimizer is distributed Muon + AdamW, the loss is normalised over the global
batch, gradient norm/clipping and expert loads are global, and checkpoints are DCP (any layout resumes).
The data loaders shard by data-parallel rank (`data_rank`, `data_world`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from model import ModelConfig
from optim import OptimConfig
from optim.distributed import build_distributed_optimizer
from train import checkpoint, rng
from train.config import to_object
from train.loop import Trainer
from train.parallel import checkpoint as dist_checkpoint
from train.parallel.env import detect_env, init_distributed
from train.parallel.layout import resolve_layout
from train.parallel.mesh import build_mesh
from train.parallel.parallelize import parallelize
from train.precision import autocast, resolve_device

log = logging.getLogger(__name__)


def wants_parallel(cfg: DictConfig) -> bool:
    """True under torchrun/srun with several processes, when `parallel.*` asks for a split, or when
    `parallel.dp` is set explicitly (`parallel.dp=1`: the parallel code path on one process: a process
    group of one, FSDP2 wrapping, expert dispatch with ep=1)."""
    p = cfg.parallel
    return detect_env().world > 1 or p.get("dp") is not None or any((p.get(k) or 1) > 1 for k in ("ep", "pp"))


def make_trainer(cfg: DictConfig, run_dir: Path, data_builder) -> Trainer:
    """`DeepSpeedTrainer` for parallel.engine=deepspeed, `ParallelTrainer` when `wants_parallel(cfg)`, else
    the one-process `Trainer`."""
    if cfg.parallel.get("engine") == "deepspeed":
        from train.parallel.deepspeed.trainer import DeepSpeedTrainer

        return DeepSpeedTrainer(cfg, run_dir, data_builder)
    return (ParallelTrainer if wants_parallel(cfg) else Trainer)(cfg, run_dir, data_builder)


class _BiasUpdates:
    """`bias_updater` of the loop: splits this rank's concatenated expert loads per stage module."""

    def __init__(self, pm):
        self.pm = pm

    def update(self, loads: torch.Tensor) -> None:
        sizes = [len(u.buffers) for u in self.pm.updaters]
        for updater, part in zip(self.pm.updaters, loads.split(sizes)):
            if len(part):
                updater.update(part)


class ParallelTrainer(Trainer):
    def __init__(self, cfg: DictConfig, run_dir: Path, data_builder):
        t = to_object(cfg, "trainer")
        model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
        self.layout = resolve_layout(cfg.parallel, detect_env().world, model_cfg, t.batch_size)
        device = resolve_device(t.device)
        init_distributed(device.type)
        self.pmesh = build_mesh(self.layout, device.type)
        self.data_rank, self.data_world = self.pmesh.dp_rank, self.layout.dp
        super().__init__(cfg, run_dir, data_builder)  # the whole model, identical on every rank (same seed)
        if cfg.get("init"):  # one-process (safetensors) weights, loaded whole before the split
            checkpoint.load(Path(cfg.init), self.model)
        self.pm, self.optimizer = self.build_engine(OptimConfig.from_dict(cfg.optim))
        self.bias_updater = _BiasUpdates(self.pm)
        if dist.get_rank() > 0:  # metrics of other ranks go apart (checkpoints: ckpt_root, already set)
            self.run_dir = self.run_dir / "ranks" / str(dist.get_rank())
            self.run_dir.mkdir(parents=True, exist_ok=True)
        log.info("parallel layout: %s", self.layout.describe())

    def build_engine(self, optim_cfg: OptimConfig):
        """(split model, its optimizer): FSDP2 + distributed Muon (engine=deepspeed overrides this)."""
        pm = parallelize(self.model, self.pmesh, bias_update_speed=optim_cfg.bias_update_speed)
        return pm, build_distributed_optimizer(pm.modules, optim_cfg)

    # ------------------------------------------------------------------ one step
    def accumulate(self, batches, mtp_weight: float) -> dict[str, torch.Tensor]:
        ctx = functools.partial(autocast, self.precision, self.device)
        res = self.pm.forward_backward([self._to_device(b) for b in batches], mtp_weight, ctx)
        sums = {k: torch.tensor(v) for k, v in res["parts"].items()}
        loads = [x for x in res["expert_loads"] if x is not None]
        if loads:
            sums["expert_loads"] = torch.cat(loads).float().cpu()  # this rank's layers
        return sums

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        return torch.tensor(self.pm.clip_grad_norm_(max_norm if max_norm > 0 else float("inf")))

    def evaluate(self) -> float | None:
        """Token-weighted next-token CE over `trainer.eval_batches` global val batches (all data ranks)."""
        if getattr(self.data, "val", None) is None:
            return None
        self.pm.train(False)
        ctx = functools.partial(autocast, self.precision, self.device)
        total = count = 0.0
        for batch in self.data.val.eval_batches(self.t.eval_batches):
            loss, n = self.pm.eval_loss(self._to_device(batch), ctx)
            total, count = total + loss * n, count + n
        self.pm.train(True)
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ checkpoints (DCP)
    def start(self) -> None:
        """resume=auto: the newest complete checkpoint of the run; `init` weights were loaded before the
        model was split (`__init__`)."""
        resume = str(self.cfg.resume)
        path = checkpoint.find_latest(self.ckpt_root) if resume == "auto" else (
            None if resume == "never" else Path(resume))
        if path is not None:
            self.restore(path)
            log.info("resumed from %s at step %d", path, self.step)

    def restore(self, path: Path, keep_data_position: bool = False) -> None:
        state = self.load_checkpoint(path)
        if not keep_data_position:
            self.data.train.load_state_dict(state["data"])
        self.guard.load_state_dict(state["guard"])
        self.rollbacks = state.get("rollbacks", 0)
        rng.restore(state["rng"])
        self.step, self.last_checkpoint = state["step"], path

    def save(self) -> Path:
        path = self.ckpt_root / f"step-{self.step}"
        state = {"step": self.step, "data": self.data.train.state_dict(), "guard": self.guard.state_dict(),
                 "rollbacks": self.rollbacks, "rng": rng.capture(),
                 "config": OmegaConf.to_container(self.cfg, resolve=True)}
        self.save_checkpoint(path, state)
        self.last_checkpoint = path
        if dist.get_rank() == 0:
            checkpoint.prune(self.ckpt_root, self.cfg.checkpoint.keep)
        dist.barrier()
        return path

    def load_checkpoint(self, path: Path) -> dict:
        return dist_checkpoint.load(path, self.pm, self.optimizer)

    def save_checkpoint(self, path: Path, state: dict) -> None:
        dist_checkpoint.save(path, self.pm, self.optimizer, state)
