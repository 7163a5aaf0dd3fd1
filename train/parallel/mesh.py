"""One object owning the device mesh: dims (pp, edp, ep) with dp = edp x ep flattened from them.

Rank order is pp-major, ep innermost: rank = (pp_rank * edp + edp_rank) * ep + ep_rank, so the ranks that
exchange tokens (ep) are neighbours and the data-parallel rank is edp_rank * ep + ep_rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from model.errors import MoeforgeError
from train.parallel.layout import Layout


@dataclass
class ParallelMesh:
    layout: Layout
    mesh: DeviceMesh
    device_type: str

    def sub(self, name: str) -> DeviceMesh:
        """The 1-D mesh of axis `name`: pp, dp, ep or edp."""
        return self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup:
        return self.mesh[name].get_group()

    def rank(self, name: str) -> int:
        return self.mesh[name].get_local_rank()

    @property
    def dp_rank(self) -> int:
        return self.rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.rank("pp")

    @property
    def ep_rank(self) -> int:
        return self.rank("ep")


def build_mesh(layout: Layout, device_type: str = "cpu") -> ParallelMesh:
    """Build the mesh for `layout` (validated already) on the started default process group."""
    if not dist.is_initialized():
        raise MoeforgeError("train.parallel.build_mesh needs a process group (call init_distributed first)")
    if dist.get_world_size() != layout.world:
        raise MoeforgeError(f"layout is for {layout.world} processes but the job has {dist.get_world_size()}")
    shape = (layout.pp, layout.edp, layout.ep)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=("pp", "edp", "ep"))
    mesh["edp", "ep"]._flatten("dp")
    return ParallelMesh(layout, mesh, device_type)
