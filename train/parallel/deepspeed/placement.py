"""Putting the model on the device for a DeepSpeed engine, without ever holding it whole there under ZeRO-3.

ZeRO-1/2 keep every parameter whole on every rank (DeepSpeed's flat buffers are on the device): the model
moves there whole. ZeRO-3 exists for models that do not fit whole, so the model must come from the host
(`DeepSpeedTrainer.build_device`; the bench builds it there too) and be partitioned on its way:
`deepspeed.zero.Init(module=model)` (DeepSpeed's documented way to partition an allocated module) takes the
parameters one at a time: it moves one whole to the device, broadcasts it over its partition group, keeps
this rank's slice (on the device, or in host memory with offload_param=cpu) and frees the whole before the
next. DeepSpeed's engine then sees a partitioned model and does not move it (it would `module.to(device)`
an unpartitioned one). Only the buffers (routing biases, hash tables: megabytes) move whole.

Bound, model bytes on the device while partitioning: the largest single parameter (whole, its dtype) + this
rank's partitions of the parameters done so far (ceil(numel / partition world) each; zero with
offload_param=cpu) + the buffers. For the 2.9 B-parameter bench model under ZeRO-3 + offload that is one
expert stack, 50.3 M fp32 elements = 192 MiB (+ 3 MiB of buffers), instead of the whole 10.8 GiB.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from model.block import Block

log = logging.getLogger(__name__)


def place_model(deepspeed, model: nn.Module, stage: int, config: dict, group_name: str,
                device: torch.device) -> None:
    """Place `model` (experts already split over `ep`) for a ZeRO-`stage` engine with DeepSpeed `config`."""
    if stage != 3:
        model.to(device)
        return
    _place_zero3_experts(model, group_name)
    # blocks read their submodules' weights directly (the grouped output projection reads wo_a.weight,
    # shared experts w1.weight...): ZeRO-3 gathers a whole block at its forward, FSDP2's granularity
    deepspeed.utils.set_z3_leaf_modules(model, [Block])
    if device.type != "cpu" and any(p.device.type == device.type for p in model.parameters()):
        log.warning("ZeRO-3: the model was built on %s, so it was whole on the device once; build it on the "
                    "host (DeepSpeedTrainer.build_device) to stay within the partitioned bound", device)
    deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=next(model.parameters()).dtype)
    buffers_to(model, device)


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move the buffers of every submodule to `device`, leaving parameters as they are."""
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = b.to(device)


def _place_zero3_experts(model: nn.Module, group_name: str) -> None:
    """ZeRO-3: partition expert parameters over their expert-data group (DeepSpeed's placement family
    for expert parameters), everything else over the data axis; read when the parameter is partitioned."""
    from deepspeed.utils import groups

    edp = groups._get_expert_data_parallel_group(group_name)
    for p in model.parameters():
        if getattr(p, "group_name", None) == group_name:
            p.ds_zero_placement_family, p.ds_zero_partition_group_name = "autoep_expert", group_name
            p.ds_zero_partition_process_group, p.ds_zero_partition_rank = edp, dist.get_rank(edp)
