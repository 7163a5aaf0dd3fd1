"""`DeepSpeedTrainer`: the training loop on a device mesh with DeepSpeed ZeRO owning the data axis.

Everything but the engine is `ParallelTrainer`'s (layout check, process group, mesh, data sharding,
global loss normalisation, metrics, guard, schedule, bias updates, moeforge checkpoints). The model's
experts are placed over `ep` as natively; DeepSpeed (parallel.zero_stage 1/2/3, offload options)
partitions optimizer states, gradients and parameters of the data axis; the optimizer is moeforge's
Muon + AdamW (`ZeroOptimizer`), verified on the first step (`verify.muon_check`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from optim import OptimConfig
from train.parallel.deepspeed import checkpoint as ds_checkpoint
from train.parallel.deepspeed.engine import DeepSpeedStep, build_deepspeed
from train.parallel.deepspeed.options import zero_options
from train.parallel.deepspeed.runtime import teardown
from train.parallel.deepspeed.verify import muon_check
from train.parallel.env import detect_env
from train.parallel.trainer import ParallelTrainer

log = logging.getLogger(__name__)


class DeepSpeedTrainer(ParallelTrainer):
    def build_device(self) -> torch.device:
        """The host: the engine places the model (ZeRO-1/2 whole on the device; ZeRO-3 partitioned on its
        way there, so a model that does not fit the device whole is never whole on it; `placement`)."""
        return torch.device("cpu")

    def build_engine(self, optim_cfg: OptimConfig):
        opts = zero_options(self.cfg.parallel)
        pm = build_deepspeed(self.model, self.pmesh, optim_cfg, opts, micro_batch=self.t.batch_size,
                             bias_update_speed=optim_cfg.bias_update_speed)
        log.info("DeepSpeed ZeRO-%d (offload optimizer: %s, parameters: %s)", opts.stage,
                 opts.offload_optimizer, opts.offload_param)
        check = functools.partial(muon_check, pm) if optim_cfg.name == "muon" else None
        return pm, DeepSpeedStep(pm, check)

    def load_checkpoint(self, path: Path) -> dict:
        return ds_checkpoint.load(path, self.pm)

    def save_checkpoint(self, path: Path, state: dict) -> None:
        ds_checkpoint.save(path, self.pm, state)

    def train(self, first: dict | None = None) -> list[dict]:
        records = super().train(first)
        # a launched rank ends with a barrier and a clean process-group end (a DeepSpeed process can abort
        # at exit otherwise); one process keeps its group of one, and DeepSpeed the groups made on it, for
        # the next in-process step
        if detect_env().source != "single":
            teardown()
        return records
