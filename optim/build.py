"""build_optimizer(model, cfg): parameters split by rules into Muon and AdamW, one CombinedOptimizer."""

from __future__ import annotations

import logging

import torch
from torch import nn

from optim.combined import CombinedOptimizer
from optim.config import OptimConfig
from optim.muon import Muon
from optim.newton_schulz import hybrid_schedule
from optim.rules import ADAMW_RULES, V4_RULES, Assignment, Rule, assign_parameters, format_table

log = logging.getLogger(__name__)


def _muon_groups(assignments: list[Assignment]) -> list[dict]:
    """One Muon group per distinct row split (the split is a group option)."""
    groups: dict[tuple | None, dict] = {}
    for a in assignments:
        label = "muon" if a.row_splits is None else "muon/rows=" + "+".join(map(str, a.row_splits))
        new = {"params": [], "names": [], "label": label, "row_splits": a.row_splits}
        g = groups.setdefault(a.row_splits, new)
        g["params"].append(a.param)
        g["names"].append(a.name)
    return list(groups.values())


def _adamw(assignments: list[Assignment], cfg: OptimConfig) -> torch.optim.AdamW | None:
    if not assignments:
        return None
    names = [a.name for a in assignments]
    group = {"params": [a.param for a in assignments], "names": names, "label": "adamw"}
    on_gpu = all(a.param.device.type == "cuda" for a in assignments)
    return torch.optim.AdamW(
        [group],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=True if on_gpu else None,
    )


def build_optimizer(
    model: nn.Module, cfg, rules: tuple[Rule, ...] | None = None
) -> tuple[CombinedOptimizer, str]:
    """(optimizer, table): Muon + AdamW for optim=muon, AdamW alone for optim=adamw.

    `cfg` is an OptimConfig, a dict or a DictConfig of the `optim` group; `rules` overrides the default
    rule list. The table (pattern, optimizer, split, count, numel) is also logged.
    """
    cfg = cfg if isinstance(cfg, OptimConfig) else OptimConfig.from_dict(cfg)
    rules = rules if rules is not None else (V4_RULES if cfg.name == "muon" else ADAMW_RULES)
    assignments = assign_parameters(model, rules)
    muon_part = [a for a in assignments if a.rule.optimizer == "muon"]
    muon = None
    if muon_part:
        muon = Muon(
            _muon_groups(muon_part),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=cfg.nesterov,
            update_rms=cfg.update_rms,
            ns_coeffs=hybrid_schedule(cfg.ns_steps, cfg.ns_pin_steps),
            ns_dtype=cfg.ns_dtype,
        )
    adamw = _adamw([a for a in assignments if a.rule.optimizer == "adamw"], cfg)
    opt = CombinedOptimizer({"muon": muon, "adamw": adamw})
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    table = format_table(assignments, rules)
    log.info("optimizer parameter split:\n%s", table)
    return opt, table
