"""Sparse gather attention against the dense masked reference; the indexer KL loss and who it trains."""

import pytest
import torch
from v4_test_helpers import randomize_ours_, small_model_config

from model import Transformer
from model.indexer_loss import indexer_kl

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def pair(layer_types, **overrides):
    """(dense, sparse) models with identical random weights; sparse in odd-sized query chunks."""
    dense = Transformer(small_model_config(layer_types, attn_impl="dense", **overrides))
    randomize_ours_(dense, 2)
    chunked = small_model_config(layer_types, attn_impl="sparse", attn_chunk_tokens=7, **overrides)
    sparse = Transformer(chunked)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def packed_batch(seq=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, seq), generator=gen)
    cuts = torch.tensor([[0] * 37 + [1] * 3 + [2] * (seq - 40)], dtype=torch.long)
    doc_ids = torch.cat([torch.zeros(1, seq, dtype=torch.long), cuts])
    return ids, doc_ids


def training_loss(out):
    lm = out.logits.logsumexp(-1).mean() - out.logits[..., 3].mean()
    return lm + 0.3 * out.mtp_logits[0].logsumexp(-1).mean() + out.balance_loss + out.indexer_loss


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_sparse_equals_dense_in_outputs_and_gradients(mode):
    dense, sparse = pair([C, H, S, C], indexer_loss_mode=mode, index_topk=5)
    ids, doc_ids = packed_batch()
    outs = []
    for model in (dense, sparse):
        out = model(ids, doc_ids)
        training_loss(out).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].indexer_loss, outs[0].indexer_loss, rtol=1e-5, atol=1e-6)
    assert outs[0].indexer_loss > 0 and outs[0].logits.std() > 0.1
    grads = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        ref = grads[name].grad
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5, msg=name)


def test_sparse_without_grad_and_in_one_chunk():
    dense, sparse = pair([C, H], indexer_loss_mode="off")
    ids, doc_ids = packed_batch(seq=45, seed=1)
    with torch.no_grad():
        ref = dense(ids, doc_ids)
        got = sparse(ids, doc_ids)
        sparse.config.attn_chunk_tokens = 0  # automatic: one chunk at this size
        whole = sparse(ids, doc_ids)
    assert ref.indexer_loss is None and got.indexer_loss is None
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_indexer_kl_matches_explicit_formula():
    gen = torch.Generator().manual_seed(0)
    b, h, s, w, k = 2, 3, 5, 4, 6
    win = torch.randn(b, h, s, w, generator=gen)
    ent = torch.randn(b, h, s, k, generator=gen)
    sink = torch.randn(h, generator=gen)
    scores = torch.randn(b, s, k, generator=gen, requires_grad=True)
    ok = torch.rand(b, s, k, generator=gen) > 0.4
    ok[0, 0] = False  # a query with an empty set does not count
    total, n = indexer_kl(win, ent.masked_fill(~ok.unsqueeze(1), float("-inf")), sink, scores, ok)
    expected, count = 0.0, 0
    for bi in range(b):
        for si in range(s):
            sel = ok[bi, si]
            if not sel.any():
                continue
            mass = torch.zeros(k)
            for hi in range(h):
                z = torch.cat([win[bi, hi, si], ent[bi, hi, si][sel], sink[hi : hi + 1]])
                mass[sel] += torch.softmax(z, 0)[w : w + int(sel.sum())]
            p = mass[sel] / mass[sel].sum()
            log_q = torch.log_softmax(scores[bi, si][sel], 0)
            expected = expected + (p * (p.log() - log_q)).sum()
            count += 1
    assert n.item() == count
    torch.testing.assert_close(total, expected)
    total.backward()
    assert scores.grad[~ok].abs().max() == 0 and scores.grad[ok].abs().max() > 0


def test_every_parameter_learns_and_the_indexer_only_from_its_loss():
    model = Transformer(small_model_config([S, C, H, C], index_topk=3))
    randomize_ours_(model, 4)
    ids, doc_ids = packed_batch(seq=64, seed=3)
    out = model(ids, doc_ids)
    rest = training_loss(out) - out.indexer_loss
    params = dict(model.named_parameters())
    indexer = {n for n in params if ".attn.indexer." in n}
    assert indexer and all(p.requires_grad for p in params.values())
    kw = dict(retain_graph=True, allow_unused=True)
    g_index = torch.autograd.grad(out.indexer_loss, list(params.values()), **kw)
    g_rest = torch.autograd.grad(rest, list(params.values()), **kw)
    for (name, _), gi, gr in zip(params.items(), g_index, g_rest):
        nonzero_i = gi is not None and gi.abs().sum() > 0
        nonzero_r = gr is not None and gr.abs().sum() > 0
        assert nonzero_i == (name in indexer), name
        assert nonzero_r == (name not in indexer), name
    training_loss(out).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


MEMORY_PROBE = """
import resource, torch
from model import ModelConfig, Transformer
torch.set_num_threads(1)
C, H = "compressed_sparse_attention", "heavily_compressed_attention"
cfg = ModelConfig(vocab_size=97, hidden_size=16, moe_intermediate_size=8, num_hidden_layers=2,
    num_attention_heads=2, head_dim=16, q_lora_rank=8, partial_rotary_factor=0.25, num_experts_per_tok=2,
    n_routed_experts=4, layer_types=[C, H], mlp_layer_types=["moe", "moe"], hc_mult=2, hc_sinkhorn_iters=3,
    o_groups=1, o_lora_rank=8, index_n_heads=1, index_head_dim=4, index_topk=64, num_nextn_predict_layers=0,
    max_position_embeddings=65536, attn_impl="sparse", indexer_loss_mode="sparse")
model = Transformer(cfg)
out = model(torch.randint(0, 97, (1, SEQ)))
(out.logits.logsumexp(-1).mean() + out.indexer_loss + out.balance_loss).backward()
assert all(p.grad is not None for p in model.parameters())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_sparse_training_step_at_32k_tokens_fits_where_dense_cannot():
    import subprocess
    import sys
    from pathlib import Path

    seq, heads = 32768, 2
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE.replace("SEQ", str(seq))], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    peak = int(run.stdout.split()[-1])  # whole process, Python and torch included
    dense_scores = seq * seq * 4 * heads  # one fp32 [H, S, S] logits tensor of the dense reference
    print(f"sparse forward+backward at {seq} tokens: peak RSS {peak / 2**30:.2f} GiB; "
          f"dense S x S fp32 logits alone: {dense_scores / 2**30:.1f} GiB")
    assert peak < dense_scores / 4

