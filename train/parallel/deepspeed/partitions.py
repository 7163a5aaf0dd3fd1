"""DeepSpeed's flat fp32 partitions after `deepspeed.initialize`, described as `FlatLayout`s.

Read from the ZeRO optimizer once, at start: ZeRO-1/2 (`DeepSpeedZeroOptimizer`) keep one flat low-
precision buffer per parameter group (the model's parameters are views into it) and this rank's fp32
slice of it; ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`) keeps per sub-group this rank's slices of each
parameter (`param.ds_tensor`) and their fp32 copy. Every layout is checked against what DeepSpeed
recorded itself (ZeRO-1/2: each parameter's `_hp_mapping` fragment; ZeRO-3: `partition_numel`), so a
DeepSpeed version that lays partitions out differently stops the run instead of corrupting Muon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.errors import MoeforgeError
from train.parallel.deepspeed.flat import FlatLayout, contiguous_layout, per_param_layout


@dataclass
class Partition:
    """One flat fp32 partition: its layout, the tensor, the model parameters in layout order, its group."""

    layout: FlatLayout
    flat: torch.Tensor
    params: list[nn.Parameter]
    group: dict
    stage: int


def read_partitions(zopt, stage: int, names: dict[int, str]) -> list[Partition]:
    """The partitions of ZeRO optimizer `zopt` (`names`: id(model parameter) -> moeforge name)."""
    return _stage3(zopt, names) if stage == 3 else _stage12(zopt, stage, names)


def _stage12(zopt, stage: int, names: dict[int, str]) -> list[Partition]:
    out = []
    for i, params in enumerate(zopt.round_robin_bit16_groups):
        pg = zopt.real_dp_process_group[i]
        buffer = zopt.bit16_groups_flat[i]
        offsets = [(p.data_ptr() - buffer.data_ptr()) // p.element_size() for p in params]
        for p, off in zip(params, offsets):
            if not 0 <= off <= buffer.numel() - p.numel():
                raise MoeforgeError(f"{names[id(p)]} is not a view into DeepSpeed's flat group buffer")
        layout = contiguous_layout([names[id(p)] for p in params], [p.shape for p in params], offsets,
                                   int(zopt.partition_size[i]), dist.get_world_size(pg), dist.get_rank(pg),
                                   pg)
        _check_fragments(layout, params)
        out.append(Partition(layout, zopt.single_partition_of_fp32_groups[i], list(params),
                             zopt.optimizer.param_groups[i], stage))
    return out


def _check_fragments(layout: FlatLayout, params: list[nn.Parameter]) -> None:
    """This rank's pieces are exactly DeepSpeed's own record of them (`_hp_mapping`)."""
    mine = {p.index: p for p in layout.mine()}
    for i, param in enumerate(params):
        mapping = getattr(param, "_hp_mapping", None)
        piece = mine.get(i)
        if mapping is None:
            if piece is not None:
                raise MoeforgeError(f"{layout.names[i]}: DeepSpeed keeps no fragment here, the layout does")
            continue
        ds = (mapping.hp_fragment_address.start, mapping.lp_fragment_address.start,
              mapping.lp_fragment_address.numel)
        if piece is None or (piece.part_off, piece.param_off, piece.length) != ds:
            raise MoeforgeError(f"{layout.names[i]}: DeepSpeed's fragment (partition offset, parameter "
                                f"offset, length) {ds} is not moeforge's {piece}")


def _stage3(zopt, names: dict[int, str]) -> list[Partition]:
    out = []
    for i, params in enumerate(zopt.fp16_groups):
        pg = zopt.sub_group_process_groups[i]
        world = dist.get_world_size(pg)
        layout = per_param_layout([names[id(p)] for p in params], [p.ds_shape for p in params], world,
                                  dist.get_rank(pg), pg)
        for p in params:
            if p.partition_numel() != -(-p.ds_numel // world):
                raise MoeforgeError(f"{names[id(p)]}: DeepSpeed partitions it into {p.partition_numel()} "
                                    f"elements per rank, moeforge expects ceil({p.ds_numel} / {world})")
        flat = zopt.fp32_partitioned_groups_flat[i]
        if flat.numel() != layout.partition_numel:
            raise MoeforgeError(f"ZeRO-3 sub-group {i}: {flat.numel()} fp32 elements, layout "
                                f"{layout.partition_numel}")
        group = zopt.optimizer.param_groups[zopt.sub_group_to_group_id[i]]
        out.append(Partition(layout, flat, list(params), group, 3))
    return out
