"""Tiles of 128 rows inside expert segments, found on the device (no host synchronisation).

Experts own contiguous row segments of a token-sorted matrix; ``offs[e]`` is the cumulative end row of
expert e (the ``torch._grouped_mm`` convention; empty experts repeat the previous offset). Segment e is cut
into ceil(count_e / 128) tiles; tiles are numbered expert by expert. The number of tiles is at most
``max_tiles(M, E)``, which the host knows without reading ``offs``.
"""

import torch
import triton
import triton.language as tl

from model.errors import MoeforgeError

from .runtime import GROUP, cdiv


def max_tiles(m: int, n_groups: int, block: int = GROUP) -> int:
    """Upper bound on the number of row tiles over all segments."""
    return cdiv(m, block) + n_groups


def check_offsets(offs: torch.Tensor, m: int) -> None:
    if offs.dim() != 1 or offs.dtype != torch.int32:
        raise MoeforgeError(f"expert offsets must be a 1-D int32 tensor of cumulative ends, got {offs.dtype} "
                            f"with shape {tuple(offs.shape)}")
    if offs.numel() == 0:
        raise MoeforgeError("expert offsets are empty: need one cumulative end per expert")
    del m  # the last offset may be < m (trailing padding rows are left untouched)


def tile_ends(offs: torch.Tensor, block: int = GROUP) -> torch.Tensor:
    """Cumulative tile count per expert [E] int32, computed on the device of ``offs``."""
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    counts = (offs - starts).clamp_min(0)
    return torch.cumsum((counts + block - 1) // block, 0).to(torch.int32)


def tile_rows_ref(offs: torch.Tensor, block: int = GROUP) -> list[tuple[int, int, int]]:
    """Host-side list of (expert, row0, row_end) per tile, in tile order (for references and tests)."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        for r in range(start, end, block):
            out.append((e, r, min(r + block, end)))
        start = max(start, end)
    return out


@triton.jit
def segment_tile(t, offs_ptr, tile_end_ptr, E, BLOCK_E: tl.constexpr, BLOCK: tl.constexpr):
    """For tile t: (expert, first row, end row); end row <= first row when t is past the last tile."""
    idx = tl.arange(0, BLOCK_E)
    ends = tl.load(tile_end_ptr + idx, mask=idx < E, other=2147483647)
    e = tl.sum((ends <= t).to(tl.int32), axis=0)
    e_safe = tl.minimum(e, E - 1)
    first_tile = tl.where(e_safe > 0, tl.load(tile_end_ptr + e_safe - 1, mask=e_safe > 0, other=0), 0)
    seg_start = tl.where(e_safe > 0, tl.load(offs_ptr + e_safe - 1, mask=e_safe > 0, other=0), 0)
    seg_end = tl.load(offs_ptr + e_safe)
    row0 = seg_start + (t - first_tile) * BLOCK
    row_end = tl.where(e < E, tl.minimum(seg_end, row0 + BLOCK), row0)
    return e_safe, row0, row_end


def block_e(n_groups: int) -> int:
    return max(16, triton.next_power_of_2(n_groups))
