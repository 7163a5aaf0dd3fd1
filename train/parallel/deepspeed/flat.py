"""Where each parameter's elements lie in DeepSpeed's flat ZeRO partitions, and whole-tensor exchange.

ZeRO-1/2 flatten a parameter group into one buffer (parameters back to back, maybe with alignment
padding) and give rank r the r-th equal slice of it; ZeRO-3 splits every parameter on its own into
`ceil(numel / world)`-element slices (the last padded) and concatenates this rank's slices of a
sub-group. Either way a rank's fp32 partition is one flat tensor, and a parameter's elements on rank r
are one contiguous run, a `Piece`. A `FlatLayout` lists the pieces of every rank (each rank can compute
all of them), so `gather_whole` brings whole parameters to an owner rank and `scatter_pieces` sends the
owner's whole result back as every rank's pieces: one `all_to_all_single` each way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from model.errors import MoeforgeError
from optim.distributed import assign_owners
from train.parallel.env import collective, comm_device


@dataclass(frozen=True)
class Piece:
    index: int  # parameter index in the layout
    part_off: int  # offset in the rank's flat partition
    param_off: int  # offset in the parameter's flattened elements
    length: int


@dataclass
class FlatLayout:
    """The pieces of `names` (shapes `shapes`) in the flat partitions of the ranks of `group`."""

    names: list[str]
    shapes: list[torch.Size]
    partition_numel: int
    pieces: list[list[Piece]]  # per rank of `group`, in partition order
    rank: int
    group: dist.ProcessGroup | None = None
    _numels: list[int] = field(default_factory=list)

    def __post_init__(self):
        self._numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self._check()

    @property
    def world(self) -> int:
        return len(self.pieces)

    def numel(self, index: int) -> int:
        return self._numels[index]

    def mine(self) -> list[Piece]:
        return self.pieces[self.rank]

    def _check(self) -> None:
        covered = [0] * len(self.names)
        for rank_pieces in self.pieces:
            for p in rank_pieces:
                if p.part_off < 0 or p.part_off + p.length > self.partition_numel:
                    raise MoeforgeError(f"ZeRO layout: {self.names[p.index]} piece {p} leaves the "
                                        f"{self.partition_numel}-element partition")
                covered[p.index] += p.length
        bad = [n for n, c, total in zip(self.names, covered, self._numels) if c != total]
        if bad:
            raise MoeforgeError(f"ZeRO layout does not cover {bad[:3]} exactly once")

    def buckets(self, limit: int) -> list[list[int]]:
        """Consecutive parameter indices whose whole sizes add up to at most `limit` (at least one each)."""
        return chunk_by_size(list(range(len(self.names))), self._numels, limit)

    def gaps(self) -> list[tuple[int, int]]:
        """(offset, length) of this rank's partition elements no parameter owns (alignment padding)."""
        out, pos = [], 0
        for p in sorted(self.mine(), key=lambda p: p.part_off):
            if p.part_off > pos:
                out.append((pos, p.part_off - pos))
            pos = max(pos, p.part_off + p.length)
        return out + ([(pos, self.partition_numel - pos)] if pos < self.partition_numel else [])

    def owners(self, indices: list[int]) -> dict[int, int]:
        """An owning rank for each parameter index, balanced by size."""
        return dict(zip(indices, assign_owners([self._numels[i] for i in indices], self.world)))


def chunk_by_size(items: list, sizes: list[int], limit: int) -> list[list]:
    """Consecutive runs of `items` whose `sizes` add up to at most `limit` (at least one item each)."""
    out, run, total = [], [], 0
    for item, n in zip(items, sizes):
        if run and total + n > limit:
            out.append(run)
            run, total = [], 0
        run.append(item)
        total += n
    return out + ([run] if run else [])


def contiguous_layout(names: list[str], shapes: list[torch.Size], offsets: list[int], partition_numel: int,
                      world: int, rank: int, group=None) -> FlatLayout:
    """ZeRO-1/2: parameter i occupies [offsets[i], offsets[i] + numel) of the group's flat buffer, and
    rank r holds [r * partition_numel, (r + 1) * partition_numel) of it."""
    pieces: list[list[Piece]] = [[] for _ in range(world)]
    for i, (shape, start) in enumerate(zip(shapes, offsets)):
        end = start + int(torch.Size(shape).numel())
        for r in range(world):
            lo, hi = max(start, r * partition_numel), min(end, (r + 1) * partition_numel)
            if lo < hi:
                pieces[r].append(Piece(i, lo - r * partition_numel, lo - start, hi - lo))
    for r in range(world):
        pieces[r].sort(key=lambda p: p.part_off)
    return FlatLayout(list(names), list(shapes), partition_numel, pieces, rank, group)


def per_param_layout(names: list[str], shapes: list[torch.Size], world: int, rank: int,
                     group=None) -> FlatLayout:
    """ZeRO-3: rank r holds elements [r * s_i, (r + 1) * s_i) of parameter i (s_i = ceil(numel / world)),
    and its partition is those slices back to back (s_i elements each, padding included)."""
    pieces: list[list[Piece]] = [[] for _ in range(world)]
    part_off = 0
    for i, shape in enumerate(shapes):
        n = int(torch.Size(shape).numel())
        size = -(-n // world)
        for r in range(world):
            length = min(size, n - r * size)
            if length > 0:
                pieces[r].append(Piece(i, part_off, r * size, length))
        part_off += size
    return FlatLayout(list(names), list(shapes), part_off, pieces, rank, group)


def _all_to_all(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], layout: FlatLayout,
                what: str) -> torch.Tensor:
    """One all_to_all_single on the communication device (an offloaded partition is on the host, NCCL
    takes only CUDA tensors); the result comes back to `send`'s device."""
    if layout.world == 1:
        return send
    device = comm_device(layout.group)
    out = torch.empty(sum(recv_splits), dtype=send.dtype, device=device)
    with collective(f"all_to_all_single({what}, ZeRO partition group)"):
        dist.all_to_all_single(out, send.to(device), recv_splits, send_splits, group=layout.group)
    return out.to(send.device)


def gather_whole(layout: FlatLayout, flat: torch.Tensor, owners: dict[int, int]) -> dict[int, torch.Tensor]:
    """Every parameter index of `owners` arrives whole (its shape) on its owner; returns this rank's."""
    me = layout.rank
    sends = [[] for _ in range(layout.world)]
    for p in layout.mine():
        if p.index in owners:
            sends[owners[p.index]].append(flat.narrow(0, p.part_off, p.length))
    send_splits = [sum(t.numel() for t in s) for s in sends]
    recv_splits = [sum(p.length for p in layout.pieces[r] if owners.get(p.index) == me)
                   for r in range(layout.world)]
    send = torch.cat([t for s in sends for t in s]) if any(send_splits) else flat.new_empty(0)
    recv = _all_to_all(send, send_splits, recv_splits, layout, "gather whole tensors")
    whole = {i: flat.new_zeros(layout.numel(i)) for i, o in owners.items() if o == me}
    pos = 0
    for r in range(layout.world):
        for p in layout.pieces[r]:
            if owners.get(p.index) == me:
                whole[p.index].narrow(0, p.param_off, p.length).copy_(recv.narrow(0, pos, p.length))
                pos += p.length
    return {i: t.view(layout.shapes[i]) for i, t in whole.items()}


def scatter_pieces(layout: FlatLayout, whole: dict[int, torch.Tensor], owners: dict[int, int],
                   out: torch.Tensor) -> None:
    """The inverse of `gather_whole`: each owner's whole tensors go back as every rank's pieces, written
    into this rank's flat `out` (elements of other parameters are left as they are)."""
    me = layout.rank
    sends = []
    for r in range(layout.world):
        for p in layout.pieces[r]:
            if owners.get(p.index) == me:
                sends.append(whole[p.index].reshape(-1).narrow(0, p.param_off, p.length))
    send_splits = [sum(p.length for p in layout.pieces[r] if owners.get(p.index) == me)
                   for r in range(layout.world)]
    mine = [p for p in layout.mine() if p.index in owners]
    recv_splits = [sum(p.length for p in mine if owners[p.index] == s) for s in range(layout.world)]
    send = torch.cat(sends).to(out.dtype) if sends else out.new_empty(0)
    recv = _all_to_all(send, send_splits, recv_splits, layout, "scatter whole tensors")
    pos = 0
    for s in range(layout.world):
        for p in mine:
            if owners[p.index] == s:
                out.narrow(0, p.part_off, p.length).copy_(recv.narrow(0, pos, p.length))
                pos += p.length
