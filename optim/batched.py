"""Fast twin of `muon.orthogonalized_update`: every same-shape block of many parameters in one NS call."""

from __future__ import annotations

import math

import torch

from model.errors import MoeforgeError
from optim.newton_schulz import newton_schulz


def check_splits(shape: torch.Size, row_splits: tuple[int, ...] | None) -> tuple[int, ...]:
    """The row blocks of a [..., rows, cols] parameter (one block when row_splits is None)."""
    splits = tuple(row_splits) if row_splits else (shape[-2],)
    if sum(splits) != shape[-2] or min(splits) < 1:
        raise MoeforgeError(f"Muon row_splits {splits} do not add up to the rows of shape {tuple(shape)}")
    return splits


def _chunks(items: list, limit: int):
    """Consecutive runs of items whose total numel stays <= limit (at least one item each)."""
    run, size = [], 0
    for item in items:
        if run and size + item[2].numel() > limit:
            yield run
            run, size = [], 0
        run.append(item)
        size += item[2].numel()
    if run:
        yield run


def orthogonalize_many(specs: list[tuple], max_batch_numel: int = 1 << 27) -> list[torch.Tensor]:
    """specs: (u, row_splits, update_rms, coeffs, ns_dtype) per parameter -> the scaled NS update of each.

    Blocks (one per row split and leading index) are bucketed by (rows, cols, dtype, device, coeffs,
    ns_dtype), concatenated up to `max_batch_numel` elements, orthogonalised as one batch, and put back.
    """
    buckets: dict[tuple, list[tuple[int, int, torch.Tensor]]] = {}
    outs, layouts = [], []
    for i, (u, row_splits, _, coeffs, ns_dtype) in enumerate(specs):
        splits = check_splits(u.shape, row_splits)
        layouts.append(splits)
        outs.append(torch.empty_like(u))
        coeffs = tuple(tuple(c) for c in coeffs)
        for j, block in enumerate(u.split(splits, dim=-2)):
            key = (block.shape[-2], block.shape[-1], u.dtype, u.device, coeffs, ns_dtype)
            buckets.setdefault(key, []).append((i, j, block.reshape(-1, *block.shape[-2:])))
    for (rows, cols, _, _, coeffs, ns_dtype), items in buckets.items():
        for chunk in _chunks(items, max_batch_numel):
            result = newton_schulz(torch.cat([b for _, _, b in chunk]), coeffs, ns_dtype)
            for (i, j, _), o in zip(chunk, result.split([b.shape[0] for _, _, b in chunk])):
                scale = math.sqrt(max(rows, cols)) * specs[i][2]
                target = outs[i].narrow(-2, sum(layouts[i][:j]), rows)
                target.copy_((o * scale).reshape(target.shape))
    return outs
