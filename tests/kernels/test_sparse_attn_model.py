"""`model.attn_impl: triton` (interpreter on CPU) equals the PyTorch sparse reference through a whole tiny
model: logits, indexer KL and every parameter gradient, on packed documents."""

import pytest
import torch

from model import Transformer
from tests.kernels.helpers import GPU
from tests.model.v4_test_helpers import randomize_ours_, small_model_config

LAYERS = ["compressed_sparse_attention", "heavily_compressed_attention"]


def batch(seq: int):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, seq), generator=gen)
    doc_ids = torch.zeros(2, seq, dtype=torch.long)
    doc_ids[1, 11:] = 1
    doc_ids[1, 14:] = 2
    return ids, doc_ids


@pytest.mark.skipif(GPU, reason="interpreter test of the model wiring; the GPU runs the kernel tests")
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_triton_model_equals_sparse_reference(mode):
    cfg = dict(indexer_loss_mode=mode, index_topk=3, compress_rates={
        "compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    ref = Transformer(small_model_config(LAYERS, attn_impl="sparse", **cfg))
    randomize_ours_(ref, 5)
    ours = Transformer(small_model_config(LAYERS, attn_impl="triton", attn_chunk_tokens=13, **cfg))
    ours.load_state_dict(ref.state_dict())
    ids, doc_ids = batch(22)
    outs = []
    for model in (ref, ours):
        out = model(ids, doc_ids)
        (out.logits.logsumexp(-1).mean() - out.logits[..., 3].mean() + out.indexer_loss).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1].indexer_loss, outs[0].indexer_loss, rtol=1e-5, atol=1e-6)
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want = grads[name].grad
        if want is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-5, msg=name)




def forward_backward(model, ids, doc_ids, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, doc_ids)
    out.logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float(), grads


@pytest.mark.skipif(GPU, reason="interpreter test of the model wiring; the GPU runs the kernel tests")
def test_triton_model_under_bf16_autocast_matches_the_reference():
    """Under autocast the queries come from a bf16 projection while the keys can stay fp32 (norm, pooling):
    the kernel path must take them (it once failed to compile on mixed dtypes, so training fell back to the
    PyTorch path). Its error against the fp32 reference stays within the bf16 reference's (x2 for logits,
    x3 plus one bf16 ulp of the gradient's scale for the gradients)."""
    cfg = dict(indexer_loss_mode="sparse", index_topk=3, compress_rates={
        "compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    ref = Transformer(small_model_config(LAYERS, attn_impl="sparse", **cfg))
    randomize_ours_(ref, 6)
    ours = Transformer(small_model_config(LAYERS, attn_impl="triton", **cfg))
    ours.load_state_dict(ref.state_dict())
    ids, doc_ids = batch(22)
    exact = forward_backward(ref, ids, doc_ids, autocast=False)
    ref.zero_grad()
    low = forward_backward(ref, ids, doc_ids, autocast=True)
    got = forward_backward(ours, ids, doc_ids, autocast=True)

    def err(a, b):
        return (a - b).abs().max().item()

    assert err(got[0], exact[0]) <= 2 * err(low[0], exact[0]) + 1e-3
    for name, g in exact[1].items():
        assert err(got[1][name], g) <= 3 * err(low[1][name], g) + 2**-8 * g.abs().max().item(), name
