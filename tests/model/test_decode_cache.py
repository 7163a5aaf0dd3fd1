"""Decode cache (prefill + one token at a time == one full forward) and routing record / replay."""

import pytest
import torch
from v4_test_helpers import randomize_ours_, small_model_config

from model import Transformer
from model.errors import MoeforgeError

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def make_model(layer_types=(S, C, H, C), seed=1, **overrides):
    """A random model; seeds are chosen so that no expert or indexer choice is a near-tie (a near-tie
    may flip under the different summation order of cached decoding, as in any implementation)."""
    overrides.setdefault("hc_sinkhorn_iters", 3)  # fewer tiny ops per step: a faster test
    model = Transformer(small_model_config(list(layer_types), **overrides)).eval()
    randomize_ours_(model, seed)
    return model


def decode(model, ids_BS, prompt_B, cache=None):
    """Prefill row b with ids[b, :prompt[b]], then feed ids[b, prompt[b] + t] at step t.

    Returns logits [B, S, V] where [b, i] are the logits after token i of row b (positions >= the row's
    fed length are zero).
    """
    b, seq = ids_BS.shape
    cache = cache or model.new_cache(b)
    rows = torch.arange(b)
    got = torch.zeros(b, seq, model.config.vocab_size)
    out = model(ids_BS, cache=cache, lengths=prompt_B)
    for r in range(b):
        got[r, : prompt_B[r]] = out.logits[r, : prompt_B[r]].float()
    for t in range(seq - int(prompt_B.min())):
        pos = prompt_B + t
        live = pos < seq
        nxt = ids_BS[rows, pos.clamp(max=seq - 1)]
        step = model(nxt[:, None], cache=cache).logits[:, 0]
        got[rows[live], pos[live]] = step[live].float()
    return got, cache


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward():
    model = make_model(attn_chunk_tokens=37)  # prefill in chunks of 37 tokens as well
    ids = torch.randint(0, 97, (1, 240), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    got, cache = decode(model, ids, torch.tensor([30]))
    assert (got - full).abs().max() < 1e-4 and full.std() > 0.1
    assert cache.lengths.tolist() == [240]
    # selection really is sparse here: more CSA entries than index_topk
    assert cache.layers[1].comp.entries.shape[1] == 60 > model.config.index_topk


@torch.no_grad()
def test_batched_rows_of_different_lengths_equal_each_row_alone():
    model = make_model(layer_types=(C, H, S))
    ids = torch.randint(0, 97, (3, 90), generator=torch.Generator().manual_seed(2))
    prompts = torch.tensor([5, 41, 18])
    got, cache = decode(model, ids, prompts)
    assert cache.lengths.tolist() == (prompts + 90 - 5).tolist()  # rows keep decoding past the end
    for r in range(3):
        alone, _ = decode(model, ids[r : r + 1], prompts[r : r + 1])
        torch.testing.assert_close(got[r], alone[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[r], model(ids[r : r + 1]).logits[0], rtol=0, atol=1e-4)


@torch.no_grad()
def test_cache_follows_the_model_dtype():
    model = make_model().cast_(torch.bfloat16)
    cache = model.new_cache(2)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    got, _ = decode(model, ids, torch.tensor([9, 20]), cache)
    ref = model(ids).logits.float()
    layer = cache.layers[1]
    for t in (layer.window, layer.comp.entries, layer.comp.kv, layer.index.entries, layer.index.gate):
        assert t.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    assert (got - ref).abs().mean() < 0.05 * ref.abs().mean()


@torch.no_grad()
def test_routing_record_and_replay():
    model = make_model(layer_types=(C, H, S))
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(4))
    out = model(ids, return_routing=True)
    k = model.config.num_experts_per_tok
    assert len(out.routing) == 3 and all(r.shape == (2, 50, k) for r in out.routing)
    # the cache records the same choices
    cache = model.new_cache(2)
    pre = model(ids[:, :30], cache=cache, return_routing=True).routing
    steps = [model(ids[:, t : t + 1], cache=cache, return_routing=True).routing for t in range(30, 50)]
    for i, ref in enumerate(out.routing):
        cached = torch.cat([pre[i]] + [s[i] for s in steps], dim=1)
        assert torch.equal(cached.sort(-1).values, ref.sort(-1).values)
    # a new selection bias changes the choices; replay keeps the recorded ones, weights from current scores
    for layer in model.layers:
        if not layer.ffn.gate.is_hash:
            layer.ffn.gate.bias.copy_(torch.randn(layer.ffn.gate.bias.shape) * 5)
    moved = model(ids, return_routing=True)
    assert not torch.equal(moved.routing[1], out.routing[1])
    assert (moved.logits - out.logits).abs().max() > 1e-3
    replayed = model(ids, routing=out.routing, return_routing=True)
    torch.testing.assert_close(replayed.logits, out.logits, rtol=0, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(replayed.routing, out.routing))


def test_bad_cache_calls_name_the_argument():
    model = make_model(layer_types=(S,))
    cache = model.new_cache(2)
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(MoeforgeError, match="lengths"):
        model(ids, cache=cache, lengths=torch.tensor([3, 7]))
    with pytest.raises(MoeforgeError, match="cache"):
        model(ids[:1], cache=cache)
    with pytest.raises(MoeforgeError, match="routing"):
        model(ids, routing=[])
