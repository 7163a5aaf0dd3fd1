"""Triton indexer scoring + top-k (interpreter on CPU) vs `Indexer.score` and `select_topk` on packed
sequences with several documents (early queries see no entry at all)."""

import pytest
import torch

from model.errors import MoeforgeError
from model.indexer import Indexer, select_topk
from model.kernels.indexer_topk import index_scores, index_topk
from tests.kernels.helpers import GPU, pick, randn
from tests.kernels.test_sparse_attn import layout

# (batch, seq, indexer heads, indexer width, rate, top-k)
SHAPE = pick((2, 48, 3, 16, 4, 3), (2, 4096, 16, 128, 4, 64))
TOL = 2e-3 if GPU else 1e-5


def inputs(seed: int):
    b, s, ni, ci, rate, _ = SHAPE
    ent = layout(b, s).entries(rate)
    q, w = randn(seed, b, s, ni, ci), randn(seed + 1, b, s, ni)
    keys = randn(seed + 2, b, ent.count, ci).to(pick(torch.float32, torch.bfloat16))  # bf16 as in the model
    return q, w, keys, ent


def test_scores_match_reference_with_mask():
    q, w, keys, ent = inputs(0)
    got = index_scores(q, w, keys, ent.first_BS, ent.nvis_BS)
    want = Indexer.score(q, w, keys).masked_fill(~ent.visible_BST, float("-inf"))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=TOL, atol=TOL * want[fin].abs().max().item())


def test_topk_selects_the_reference_set():
    q, w, keys, ent = inputs(10)
    k = SHAPE[-1]
    idx = index_topk(q, w, keys, ent.first_BS, ent.nvis_BS, k, chunk=7).long()
    ref_scores = Indexer.score(q, w, keys).masked_fill(~ent.visible_BST, float("-inf"))
    ref_idx, ref_ok = select_topk(ref_scores, ent.visible_BST, k)
    ok = idx >= 0
    assert torch.equal(ok, ref_ok)
    assert (~ok).any() and ok.any()  # early queries select nothing, later ones do
    # the same scores are picked (sets may differ only between equal scores)
    got_vals = ref_scores.gather(-1, idx.clamp(min=0)).masked_fill(~ok, 0.0).sort(-1).values
    want_vals = ref_scores.gather(-1, ref_idx).masked_fill(~ref_ok, 0.0).sort(-1).values
    assert torch.allclose(got_vals, want_vals, rtol=TOL, atol=TOL)
    whole = index_topk(q, w, keys, ent.first_BS, ent.nvis_BS, k).long()  # one chunk, whole entry span
    assert torch.equal(idx.sort(-1).values, whole.sort(-1).values)


def test_cpu_tensors_without_interpreter_name_the_setting(monkeypatch):
    q, w, keys, ent = (t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs(20))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MoeforgeError, match="model.attn_impl"):
        index_topk(q, w, keys, ent.first_BS, ent.nvis_BS, 2)
