"""`ZeroOptimizer`: moeforge's Muon + AdamW split as the optimizer that DeepSpeed ZeRO steps.

DeepSpeed hands its client optimizer one flat fp32 partition per parameter group (ZeRO-1/2: a slice of
the group's flattened parameters; ZeRO-3: this rank's slices of every parameter of a sub-group) and
calls `step()` group by group. AdamW is elementwise, so it runs on the partition as it is. Muon is not:
its momentum is elementwise, but Newton-Schulz needs whole matrices, so each Muon step gathers every
matrix's update whole on one owner rank (owners balanced by size; `flat.gather_whole`), orthogonalises
it with the same code as the native engine (`optim.batched.orthogonalize_many`: row splits, stacked
experts, V4's hybrid schedule and RMS scale) and sends the result back as every rank's pieces.
A partition whose layout moeforge does not know is refused: Muon never falls back to anything else.

Parameter groups follow DeepSpeed's MoE convention: expert stacks are separate groups with
`moe=True, name=ep_size_<ep>` and their parameters carry `allreduce=False, group_name=...`, so ZeRO
reduces and partitions them over the expert-data group only. The training loop sets `clip_coef` (the
gradient clipping factor from the global norm) and `skip` (the spike guard's verdict) before a step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.errors import MoeforgeError
from optim.batched import orthogonalize_many
from optim.build import _muon_groups
from optim.config import OptimConfig
from optim.muon import resolve_ns_dtype
from optim.newton_schulz import hybrid_schedule
from optim.rules import ADAMW_RULES, V4_RULES, assign_parameters
from train.parallel.deepspeed.flat import FlatLayout, gather_whole, scatter_pieces
from train.parallel.expert import ExpertParallel

MUON, ADAMW = "muon", "adamw"
ADAMW_STATE = ("exp_avg", "exp_avg_sq")
MUON_STATE = ("momentum_buffer",)


def expert_param_ids(model: nn.Module) -> set[int]:
    return {id(getattr(m, n)) for m in model.modules() if isinstance(m, ExpertParallel)
            for n in ("w1", "w2", "w3")}


def mark_expert_params(model: nn.Module, group_name: str) -> None:
    """DeepSpeed's MoE parameter convention: expert parameters are not all-reduced over the whole data
    axis but over the expert-data group named `group_name`."""
    ids = expert_param_ids(model)
    for p in model.parameters():
        if id(p) in ids:
            p.allreduce, p.group_name = False, group_name


def param_groups(model: nn.Module, cfg: OptimConfig, expert_group: str) -> list[dict]:
    """Muon groups (one per row split, experts apart) and one AdamW group, each with every option."""
    rules = V4_RULES if cfg.name == MUON else ADAMW_RULES
    assignments = assign_parameters(model, rules)
    experts = expert_param_ids(model)
    muon_opts = dict(kind=MUON, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                     nesterov=cfg.nesterov, update_rms=cfg.update_rms,
                     ns_coeffs=hybrid_schedule(cfg.ns_steps, cfg.ns_pin_steps), ns_dtype=cfg.ns_dtype)
    adamw_opts = dict(kind=ADAMW, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    groups = []
    for is_expert in (False, True):
        part = [a for a in assignments if (id(a.param) in experts) == is_expert]
        moe = {"moe": True, "name": expert_group} if is_expert else {}
        for g in _muon_groups([a for a in part if a.rule.optimizer == MUON]):
            label = g["label"] + ("/experts" if is_expert else "")
            groups.append({**g, **muon_opts, **moe, "label": label})
        adamw = [a for a in part if a.rule.optimizer == ADAMW]
        if adamw:
            groups.append({"params": [a.param for a in adamw], "names": [a.name for a in adamw],
                           "label": ADAMW + ("/experts" if is_expert else ""), **adamw_opts, **moe})
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


class ZeroOptimizer(torch.optim.Optimizer):
    """Muon + AdamW over DeepSpeed's flat partitions; `layouts` (id of partition -> `FlatLayout`) is bound
    once the engine has partitioned (`bind`)."""

    def __init__(self, groups: list[dict], compute_device: torch.device, bucket_numel: int = 1 << 26):
        super().__init__(groups, {})
        self.layouts: dict[int, FlatLayout] = {}
        self.compute_device = compute_device
        self.bucket_numel = bucket_numel
        self.clip_coef = 1.0
        self.skip = False

    def bind(self, layouts: dict[int, FlatLayout]) -> None:
        self.layouts = layouts

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise MoeforgeError("moeforge's ZeRO optimizer takes no closure")
        if self.skip:
            return None
        for group in self.param_groups:
            for flat in group["params"]:
                if flat.grad is None:
                    continue
                grad = flat.grad  # DeepSpeed's scratch copy for this step: scaled and reused in place
                if self.clip_coef != 1.0:
                    grad.mul_(self.clip_coef)
                if group["kind"] == MUON:
                    self._muon(flat, grad, group)
                elif group["kind"] == ADAMW:
                    adamw_step(flat, grad, self.state[flat], group)
                else:
                    raise MoeforgeError(f"parameter group {group.get('label')}: unknown kind {group['kind']}")
        return None

    def layout_of(self, flat: torch.Tensor, group: dict) -> FlatLayout:
        layout = self.layouts.get(id(flat))
        if layout is None:
            raise MoeforgeError(f"DeepSpeed handed moeforge's optimizer a partition of {flat.numel()} "
                                f"elements (group {group.get('label')}) whose layout it does not know; "
                                "refusing to step rather than orthogonalise pieces of matrices")
        if flat.numel() != layout.partition_numel:
            raise MoeforgeError(f"group {group.get('label')}: DeepSpeed's partition has {flat.numel()} "
                                f"elements, the layout {layout.partition_numel}")
        return layout

    def _muon(self, flat: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        layout = self.layout_of(flat, group)
        state = self.state[flat]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(flat)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        u = grad.add_(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        update = self.orthogonalized(layout, u, group, out=grad)  # no partition-sized temporaries
        lr = group["lr"]
        flat.mul_(1 - lr * group["weight_decay"]).add_(update, alpha=-lr)

    def orthogonalized(self, layout: FlatLayout, u: torch.Tensor, group: dict,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's pieces of the Muon update of every matrix of `layout`, from this rank's pieces of U,
        written into `out` (a new tensor when None; it may be `u` itself: a bucket's pieces are read whole
        before they are written) with the padding zeroed."""
        out = torch.zeros_like(u) if out is None else out
        for start, length in layout.gaps():
            out.narrow(0, start, length).zero_()
        ns_dtype = resolve_ns_dtype(group["ns_dtype"], self.compute_device)
        for bucket in layout.buckets(self.bucket_numel):
            owners = layout.owners(bucket)
            whole = gather_whole(layout, u, owners)
            owned = sorted(whole)
            specs = [(whole[i].to(self.compute_device), group["row_splits"], group["update_rms"],
                      group["ns_coeffs"], ns_dtype) for i in owned]
            done = {i: o.to(u.device) for i, o in zip(owned, orthogonalize_many(specs))}
            scatter_pieces(layout, done, owners, out)
        return out


def adamw_step(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) of one tensor; state in `state`.
    Its reference is torch.optim.AdamW itself (tests/parallel/test_deepspeed_units.py)."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        for key in ADAMW_STATE:
            state[key] = torch.zeros_like(p)
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    state["step"] += 1
    step = float(state["step"])
    p.mul_(1 - lr * group["weight_decay"])
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
    p.addcdiv_(state["exp_avg"], denom, value=-step_size)
