"""The runtime check that Muon stays Muon under DeepSpeed (it has had bugs where it silently stepped
another optimizer): around the first optimizer step, for one dense Muon matrix and one expert stack,
the weight change DeepSpeed applied must be moeforge's Muon update of the gradient DeepSpeed reduced.

Weights and gradient come through DeepSpeed's own accessors (`safe_get_full_fp32_param`,
`safe_get_full_grad`: whole tensors, every stage), the momentum before the step from the optimizer's
state, the expected update from the per-matrix reference Newton-Schulz (`optim.muon.orthogonalized_update`,
not the batched path the optimizer uses) of the Nesterov (or plain) momentum of the clipped gradient. A
mismatch raises `MoeforgeError` on every rank.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from model.errors import MoeforgeError
from optim.muon import orthogonalized_update, resolve_ns_dtype
from train.parallel.deepspeed.flat import gather_whole
from train.parallel.deepspeed.optimizer import MUON
from train.parallel.deepspeed.partitions import Partition
from train.parallel.env import collective, comm_device

log = logging.getLogger(__name__)
# relative, by Newton-Schulz dtype: NS amplifies rounding in small singular values (8 Keller steps), so the
# same gradient reduced along two paths differs by ~3e-4 in fp32 (measured); another optimizer is off by ~1
TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 1e-1}


def probes(pm) -> list[tuple[Partition, int]]:
    """(partition, parameter index) of the first matrix of the first dense and of the first expert Muon
    group (this rank's experts under ep > 1); groups are known by the label the rules gave them."""
    found, kinds = [], set()
    for part in pm.partitions:
        moe = bool(part.group.get("moe"))
        if part.group["label"].startswith(MUON) and moe not in kinds and part.params:
            kinds.add(moe)
            found.append((part, 0))
    return found


def _full(param, getter) -> torch.Tensor:
    t = getter(param)
    if t is None:
        raise MoeforgeError("DeepSpeed returned no tensor for a Muon probe (no gradient after backward?)")
    return t.detach().float().cpu().clone()


def _momentum(pm, part: Partition, index: int) -> torch.Tensor | None:
    """The probe's momentum before the step, whole on rank 0 of its partition group (None elsewhere)."""
    flat = pm.zero.state.get(part.flat, {}).get("momentum_buffer")
    whole = gather_whole(part.layout, flat if flat is not None else torch.zeros_like(part.flat), {index: 0})
    return whole[index].float().cpu() if index in whole else None


def expected_update(g: torch.Tensor, m0: torch.Tensor, group: dict, device: torch.device) -> torch.Tensor:
    """Muon's update from gradient `g` (clipped) and momentum `m0` before the step, per-matrix reference."""
    mu = group["momentum"]
    buf = m0 * mu + g
    u = g + mu * buf if group["nesterov"] else buf
    ns_dtype = resolve_ns_dtype(group["ns_dtype"], device)
    return orthogonalized_update(u.to(device), group["row_splits"], group["update_rms"], group["ns_coeffs"],
                                 ns_dtype).float().cpu()


@contextlib.contextmanager
def muon_check(pm):
    """Wrap the first engine step: snapshot probes before, compare after (collective on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    checks = probes(pm)
    before = [(_full(part.params[i], safe_get_full_fp32_param), _full(part.params[i], safe_get_full_grad),
               _momentum(pm, part, i)) for part, i in checks]
    coef = pm.zero.clip_coef
    yield
    errors = []
    for (part, i), (w0, g, m0) in zip(checks, before):
        w1 = _full(part.params[i], safe_get_full_fp32_param)
        if m0 is None:  # another rank of the partition group checks this one
            continue
        group, device = part.group, pm.zero.compute_device
        want = expected_update(g * coef, m0, group, device)
        applied = (w0 * (1 - group["lr"] * group["weight_decay"]) - w1) / group["lr"]
        tol = TOLERANCE.get(resolve_ns_dtype(group["ns_dtype"], device), 1e-1)
        error = float((applied - want).norm() / want.norm().clamp_min(1e-12))
        errors.append((part.layout.names[i], error, tol))
    worst = torch.tensor(max([e / tol for _, e, tol in errors], default=0.0), dtype=torch.float64,
                         device=comm_device())  # NCCL reduces no host tensor
    with collective("all_reduce(Muon check)"):
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    detail = ", ".join(f"{n}: relative error {e:.3g} (tolerance {t:g})" for n, e, t in errors)
    if worst.item() <= 1:
        if errors:
            log.info("Muon check on the first step passed: %s", detail)
    else:
        raise MoeforgeError(f"DeepSpeed did not apply moeforge's Muon update on the first step ({detail} on "
                            f"rank {dist.get_rank()}; worst ratio {float(worst):.3g} over all ranks): it "
                            "stepped something else than the orthogonalised update; stopping")
