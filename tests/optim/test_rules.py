"""The rule table: V4 split on interface names, row splits, adamw baseline, unclaimed parameters."""

import re

import pytest
import torch
from torch import nn

from model.errors import ConfigError, MoeforgeError
from optim import build_optimizer
from optim.rules import ADAMW_RULES, V4_RULES, assign_parameters, format_table
from tests.optim.v4_tree import v4_tree

ADAMW_NAMES = re.compile(r"(^embed\.weight|(^|\.)head\.weight|norm\.weight|\.base|\.scale|attn_sink|\.ape)$")


def test_v4_split_claims_every_parameter():
    model = v4_tree()
    got = {a.name: a for a in assign_parameters(model, V4_RULES)}
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, a in got.items():
        want = "adamw" if ADAMW_NAMES.search(name) else "muon"
        assert a.rule.optimizer == want, name
    assert not any("gate.bias" in n or "tid2eid" in n for n in got)  # buffers are never optimised


def test_row_splits():
    got = {a.name: a.row_splits for a in assign_parameters(v4_tree(), V4_RULES)}
    assert got["layers.0.hc_attn.fn"] == (4, 4, 16)
    assert got["mtp.0.hc_ffn.fn"] == (4, 4, 16)
    assert got["hc_head.fn"] is None
    assert got["layers.1.attn.wo_a.weight"] == (3, 3)  # o_groups = 2 blocks of d_g = 3
    assert got["layers.1.attn.compressor.wkv.weight"] == (4, 4)  # CSA [2c, d]
    assert got["layers.1.attn.indexer.compressor.wgate.weight"] == (3, 3)
    assert got["layers.0.attn.compressor.wkv.weight"] is None  # HCA [c, d]
    assert got["layers.0.ffn.experts.w1"] is None
    assert got["layers.1.ffn.gate.weight"] is None


def test_unclaimed_parameter_is_named():
    model = v4_tree()
    model.layers[0].attn.stray_bias = nn.Parameter(torch.zeros(3))
    with pytest.raises(MoeforgeError, match=r"layers\.0\.attn\.stray_bias"):
        assign_parameters(model, V4_RULES)


def test_frozen_parameters_are_skipped():
    model = v4_tree()
    model.embed.weight.requires_grad_(False)
    assert "embed.weight" not in {a.name for a in assign_parameters(model, V4_RULES)}


def test_o_groups_needs_model_config():
    model = v4_tree()
    del model.config
    with pytest.raises(ConfigError, match="model.o_groups"):
        assign_parameters(model, V4_RULES)


def test_adamw_baseline_and_table():
    model = v4_tree()
    opt, table = build_optimizer(model, {"name": "adamw"})
    assert set(opt.optimizers) == {"adamw"}
    n_params = len(list(model.parameters()))
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    assert all(a.rule in ADAMW_RULES for a in assign_parameters(model, ADAMW_RULES))
    last = table.splitlines()[-1].split()
    assert last[0] == "total" and int(last[1]) == n_params
    assert int(last[2].replace(",", "")) == sum(p.numel() for p in model.parameters())


def test_muon_table_counts():
    model = v4_tree()
    opt, table = build_optimizer(model, {"name": "muon"})
    assignments = assign_parameters(model, V4_RULES)
    assert table == format_table(assignments, V4_RULES)
    patterns = [line.split()[0] for line in table.splitlines()[1:-1]]
    assert patterns == [r.pattern for r in V4_RULES]  # rule order; the tiny tree uses every rule
    mhc_row = next(line for line in table.splitlines() if "hc_(attn|ffn)" in line).split()
    assert mhc_row[1:4] == ["muon", "mhc", "6"]  # 2 layers + 1 MTP block, attn and ffn each
    labels = {g["label"] for g in opt.param_groups}
    assert {"adamw", "muon", "muon/rows=4+4+16", "muon/rows=3+3", "muon/rows=4+4"} <= labels
