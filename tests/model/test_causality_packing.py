"""Causality around compression boundaries, and packed documents behaving exactly like separate ones."""

import pytest
import torch
from v4_test_helpers import randomize_ours_, small_model_config

from model import Transformer

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def model_for(layer_types, seed=0, **overrides):
    model = Transformer(small_model_config(layer_types, **overrides)).eval()
    randomize_ours_(model, seed)
    return model


@torch.no_grad()
@pytest.mark.parametrize("layer_type", [S, C, H])
def test_future_tokens_change_no_past_logit(layer_type):
    model = model_for([layer_type, layer_type])
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 48), generator=gen)
    base = model(ids)
    for t in (2, 3, 4, 7, 8, 9, 15, 16, 23, 31, 32, 40):
        other = ids.clone()
        other[:, t + 1 :] = torch.randint(0, 97, other[:, t + 1 :].shape, generator=gen)
        out = model(other)
        torch.testing.assert_close(out.logits[:, : t + 1], base.logits[:, : t + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(out.mtp_logits[0][:, :t], base.mtp_logits[0][:, :t], rtol=0, atol=1e-5)
        assert (out.logits[:, t + 1 :] - base.logits[:, t + 1 :]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("layer_type, reaches", [(S, False), (C, True), (H, True)])
def test_compressed_entries_carry_context_beyond_the_window(layer_type, reaches):
    model = model_for([layer_type], index_topk=50)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 97
    delta = (model(other).logits[0, 20:] - model(ids).logits[0, 20:]).abs().max().item()
    assert (delta > 1e-4) == reaches


def random_lengths(gen, total=128):
    """Random document lengths summing to `total`: short ones (below the rates) and long ones."""
    lengths = []
    while sum(lengths) < total:
        short = torch.rand(1, generator=gen).item() < 0.4
        lengths.append(int(torch.randint(1, 8 if short else 70, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


@torch.no_grad()
@pytest.mark.parametrize("impl", ["dense", "sparse"])
@pytest.mark.parametrize("layer_types", [[S, C, H, C], [H, C, S]])
def test_packed_documents_match_separate_runs(layer_types, impl):
    model = model_for(layer_types, seed=1, attn_impl=impl, attn_chunk_tokens=11)
    gen = torch.Generator().manual_seed(7 + len(layer_types))
    rows = [[37, 5, 64, 3, 19], random_lengths(gen)]  # tails shorter than the rates on purpose
    ids = torch.randint(0, 97, (2, 128), generator=gen)
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])
    packed = model(ids, doc_ids)
    for b, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            alone = model(ids[b : b + 1, start : start + n])
            got = packed.logits[b, start : start + n]
            torch.testing.assert_close(got, alone.logits[0], rtol=0, atol=1e-5)
            # MTP at position i reads token i+1: equal wherever that token is in the same document
            got_mtp = packed.mtp_logits[0][b, start : start + n - 1]
            torch.testing.assert_close(got_mtp, alone.mtp_logits[0][0, : n - 1], rtol=0, atol=1e-5)
            start += n
    assert packed.logits.std() > 0.1
    one_doc = model(ids, torch.full_like(ids, 7))
    torch.testing.assert_close(one_doc.logits, model(ids).logits, rtol=0, atol=1e-5)
