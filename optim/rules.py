"""Which optimizer each parameter gets: an ordered list of name rules (first match wins).

The names are the model's `state_dict()` keys of docs/interfaces.md. A rule may also say how a fused
matrix splits into its logical row blocks for Muon (`mhc`, `o_groups`, `halves`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from model.errors import ConfigError, MoeforgeError


@dataclass(frozen=True)
class Rule:
    """Claims trainable parameters whose name matches `pattern` (re.search) and that have >= min_ndim dims."""

    pattern: str
    optimizer: str  # "muon" | "adamw"
    split: str | None = None  # key of SPLITS, for Muon only
    min_ndim: int = 0

    def claims(self, name: str, p: torch.Tensor) -> bool:
        return p.ndim >= self.min_ndim and re.search(self.pattern, name) is not None


@dataclass
class Assignment:
    name: str
    param: nn.Parameter
    rule: Rule
    row_splits: tuple[int, ...] | None


# V4 split (v4-model-spec §8.2, §11.6): AdamW for embedding, head, norms, mHC static biases and gates,
# attention sinks and the compressors' position biases; Muon for every other matrix.
V4_RULES: tuple[Rule, ...] = (
    Rule(r"^embed\.weight$", "adamw"),
    Rule(r"(^|\.)head\.weight$", "adamw"),
    Rule(r"(^|\.)\w*norm\.weight$", "adamw"),
    Rule(r"(^|\.)hc_\w+\.(base|scale)$", "adamw"),
    Rule(r"(^|\.)attn_sink$", "adamw"),
    Rule(r"(^|\.)ape$", "adamw"),
    Rule(r"(^|\.)hc_(attn|ffn)\.fn$", "muon", split="mhc", min_ndim=2),
    Rule(r"(^|\.)attn\.wo_a\.weight$", "muon", split="o_groups", min_ndim=2),
    Rule(r"(^|\.)compressor\.(wkv|wgate)\.weight$", "muon", split="halves", min_ndim=2),
    Rule(r".", "muon", min_ndim=2),
)

# optim=adamw: the baseline, everything on AdamW.
ADAMW_RULES: tuple[Rule, ...] = (Rule(r".", "adamw"),)


def model_config_value(model: nn.Module, key: str):
    """Read `key` from the model's config object (`model.config` or `model.cfg`), or None."""
    for attr in ("config", "cfg"):
        cfg = getattr(model, attr, None)
        if cfg is not None and getattr(cfg, key, None) is not None:
            return getattr(cfg, key)
    return None


def _split_mhc(name: str, p: torch.Tensor, params: dict, model: nn.Module) -> tuple[int, ...]:
    rows = p.shape[-2]
    n = round(math.sqrt(1 + rows)) - 1
    if n < 1 or (n + 2) * n != rows:
        raise MoeforgeError(f"{name}: an mHC fn needs (2+n)*n rows for pre/post/res, got {rows}")
    return (n, n, n * n)


def _split_o_groups(name: str, p: torch.Tensor, params: dict, model: nn.Module) -> tuple[int, ...]:
    groups = model_config_value(model, "o_groups")
    if groups is None:
        raise ConfigError("model.o_groups", f"needed to split {name} into its output groups for Muon, but "
                          "the model has no config (model.config / model.cfg) with o_groups")
    rows = p.shape[-2]
    if rows % groups:
        raise ConfigError("model.o_groups", f"{groups} does not divide the {rows} rows of {name}")
    return (rows // groups,) * groups


def _split_halves(name: str, p: torch.Tensor, params: dict, model: nn.Module) -> tuple[int, ...] | None:
    """CSA compressors are [2c, d] (two overlapping windows), HCA ones [c, d]: compare with the norm's c."""
    norm_name = name.rsplit(".", 2)[0] + ".norm.weight"
    if norm_name not in params:
        raise MoeforgeError(f"{name}: cannot tell CSA from HCA without its sibling {norm_name}")
    rows, c = p.shape[-2], params[norm_name].shape[0]
    if rows == 2 * c:
        return (c, c)
    if rows == c:
        return None
    raise MoeforgeError(f"{name}: {rows} rows is neither c={c} (HCA) nor 2c (CSA) of {norm_name}")


SPLITS: dict[str, Callable] = {"mhc": _split_mhc, "o_groups": _split_o_groups, "halves": _split_halves}


def assign_parameters(model: nn.Module, rules: tuple[Rule, ...] | list[Rule]) -> list[Assignment]:
    """Give every trainable parameter to the first rule that claims it; an unclaimed one is an error."""
    params = dict(model.named_parameters())
    out = []
    for name, p in params.items():
        if not p.requires_grad:
            continue
        rule = next((r for r in rules if r.claims(name, p)), None)
        if rule is None:
            raise MoeforgeError(
                f"parameter {name!r} (shape {tuple(p.shape)}) is claimed by no optimizer rule; add a rule "
                "for it in optim/rules.py or make it a buffer"
            )
        if rule.optimizer not in ("muon", "adamw"):
            raise ConfigError("optim", f"rule {rule.pattern!r} names unknown optimizer {rule.optimizer!r}")
        splits = SPLITS[rule.split](name, p, params, model) if rule.split else None
        out.append(Assignment(name, p, rule, splits))
    return out


def format_table(assignments: list[Assignment], rules: tuple[Rule, ...] | list[Rule] = ()) -> str:
    """One row per rule that claimed something (in `rules` order): pattern, optimizer, split, count, numel."""
    rows: dict[Rule, list[int]] = {r: [0, 0] for r in rules if any(a.rule == r for a in assignments)}
    for a in assignments:
        acc = rows.setdefault(a.rule, [0, 0])
        acc[0] += 1
        acc[1] += a.param.numel()
    header = ("name pattern", "optimizer", "split", "count", "numel")
    body = [(r.pattern, r.optimizer, r.split or "-", str(c), f"{n:,}") for r, (c, n) in rows.items()]
    total = ("total", "", "", str(sum(c for c, _ in rows.values())), f"{sum(n for _, n in rows.values()):,}")
    table = [header, *body, total]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in table)
