"""Importing DeepSpeed the way moeforge uses it, its expert process groups, and a clean teardown.

moeforge never uses DeepSpeed's compiled ops: it passes its own optimizer and keeps torch's collectives.
`import_deepspeed` marks every op as unavailable before DeepSpeed looks, so it neither probes compilers
nor JIT-builds anything (on CPU it would otherwise compile its shared-memory all-reduce op, tens of
seconds, at the first `deepspeed.initialize`). A path that truly needs an op then fails instead of
building one.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from model.errors import MoeforgeError
from train.parallel.env import detect_env


def import_deepspeed(device_type: str):
    """`deepspeed` on `device_type` ("cpu" | "cuda"), with no compiled op available to it, its
    communication layer attached to the started process group."""
    os.environ.setdefault("DS_ACCELERATOR", device_type)  # read at the first get_accelerator()
    try:
        import deepspeed
        import deepspeed.ops as ds_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except ImportError as e:
        raise MoeforgeError(f"parallel.engine=deepspeed needs the deepspeed package ({e}); "
                            "pip install deepspeed") from e
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    if accel != device_type:
        raise MoeforgeError(f"DeepSpeed picked the {accel!r} accelerator but the run uses {device_type!r} "
                            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}); set trainer.device "
                            "to match or unset DS_ACCELERATOR")
    ds_ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if not dist.is_initialized():
        raise MoeforgeError("engine=deepspeed starts after the process group "
                            "(train.parallel.init_distributed)")
    os.environ.setdefault("LOCAL_RANK", str(detect_env().local_rank))  # DeepSpeed asserts it (one process)
    deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    return deepspeed


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name of the expert-parallel groups of size `ep` (its MoE parameter-group convention)."""
    return f"ep_size_{ep}"


def register_expert_groups(ep: int, pmesh) -> str:
    """Create DeepSpeed's expert / expert-data groups for `ep` and check they are our mesh's ep / edp axes.

    DeepSpeed reduces and partitions expert parameters over its expert-data group of the parameter's
    `group_name`; those groups must hold exactly the ranks of our `edp` axis."""
    from deepspeed.utils import groups

    name = expert_group_name(ep)
    groups._create_expert_and_data_parallel(ep, mp_size=1, pp_size=1)
    mine = {"ep": _ranks(pmesh.group("ep")), "edp": _ranks(pmesh.group("edp"))}
    theirs = {"ep": list(groups._get_expert_parallel_group_ranks(name)),
              "edp": list(groups._get_expert_data_parallel_group_ranks(name))}
    if mine != theirs:
        raise MoeforgeError(f"DeepSpeed's expert groups {theirs} are not moeforge's mesh axes {mine}")
    return name


def _ranks(group) -> list[int]:
    return [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]


def teardown() -> None:
    """End the job's process group cleanly: a barrier, then destroy (without it a DeepSpeed process can
    abort at interpreter exit while another rank still tears down its communicators)."""
    if dist.is_available() and dist.is_initialized():
        if torch.cuda.is_available() and dist.get_backend() == "nccl":
            torch.cuda.synchronize()
        dist.barrier()
        dist.destroy_process_group()
