"""Rollout engine: top-p against a plain reference, seeded reproducibility, stop tokens and length limits,
rollout log-probs equal to a training forward pass, cached decoding equal to recomputation, routing replay."""

import pytest
import torch
from omegaconf import OmegaConf

from data.tokenizer import PAD
from launch.compose import CONFIG_DIR
from model import ModelConfig, Transformer
from rl.rollout import SamplingConfig, generate, sample_next, token_logprobs, top_p_filter


@pytest.fixture(scope="module")
def model():
    d = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "v4-tiny.yaml"))
    d.update(vocab_size=300, num_hidden_layers=3, num_nextn_predict_layers=0,
             layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
             mlp_layer_types=["hash_moe", "moe", "moe"], initializer_range=0.2)
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_dict(d)).eval()


def prompts(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 12, (n,), generator=g).tolist()
    return [torch.randint(7, 300, (k,), generator=g).tolist() for k in lens]


def reference_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    out = torch.zeros_like(probs)
    for b in range(probs.shape[0]):
        mass = 0.0
        for i in probs[b].argsort(descending=True).tolist():
            out[b, i] = probs[b, i]
            mass += probs[b, i].item()
            if mass >= p:
                break
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_matches_reference(p):
    probs = torch.randn(6, 50).mul(2).softmax(-1)
    torch.testing.assert_close(top_p_filter(probs, p), reference_top_p(probs, p))


def test_sample_next_greedy_and_seeded():
    logits = torch.randn(5, 40)
    tok, lp = sample_next(logits, SamplingConfig(temperature=0.0), None)
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, logits.log_softmax(-1).max(-1).values)
    cfg = SamplingConfig(temperature=0.7, top_p=0.9)
    a = sample_next(logits, cfg, torch.Generator().manual_seed(3))
    b = sample_next(logits, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[1], (logits / 0.7).log_softmax(-1).gather(1, a[0][:, None]).squeeze(1))


@pytest.mark.parametrize("use_cache", [False, True])
def test_sampling_reproducible_and_logprobs_match_training_pass(model, use_cache):
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, use_cache=use_cache)
    ps = prompts()
    a = generate(model, ps, cfg, torch.Generator().manual_seed(7))
    b = generate(model, ps, cfg, torch.Generator().manual_seed(7))
    c = generate(model, ps, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.tokens, c.tokens)
    with torch.no_grad():
        logp, ent = token_logprobs(model, a, entropy=True)
    torch.testing.assert_close(logp, a.logp, atol=1e-4, rtol=1e-4)
    assert (ent[a.mask > 0] > 0).all() and (ent[a.mask == 0] == 0).all()


def test_stop_tokens_and_length_limit(model):
    ps = prompts(3, seed=2)
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    first = generate(model, ps, greedy)
    assert first.tokens.shape == (3, 6) and torch.equal(first.mask, torch.ones(3, 6))
    stop = int(first.tokens[0, 2])
    cut = generate(model, ps, SamplingConfig(max_new_tokens=6, temperature=0.0, stop_ids=(stop,)))
    for b in range(3):
        row = first.tokens[b].tolist()
        n = row.index(stop) + 1 if stop in row else 6
        assert cut.lengths[b] == n and bool(cut.stopped[b]) == (stop in row)
        assert cut.tokens[b, :n].tolist() == row[:n] and (cut.tokens[b, n:] == PAD).all()
        assert (cut.logp[b, n:] == 0).all() and (cut.mask[b, n:] == 0).all()
    ids, plen = cut.sequences()
    assert ids.shape[1] == int((plen + cut.lengths).max()) and plen.tolist() == [len(p) for p in ps]


def test_cached_decoding_equals_recomputation(model):
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0)
    ps = prompts(5, seed=3)
    cached = generate(model, ps, cfg, torch.Generator().manual_seed(5))
    ref_cfg = SamplingConfig(max_new_tokens=12, use_cache=False)
    ref = generate(model, ps, ref_cfg, torch.Generator().manual_seed(5))
    assert torch.equal(cached.tokens, ref.tokens)
    torch.testing.assert_close(cached.logp, ref.logp, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_cache", [False, True])
def test_recorded_routing_replays_to_the_same_logprobs(model, use_cache):
    cfg = SamplingConfig(max_new_tokens=8, record_routing=True, use_cache=use_cache)
    roll = generate(model, prompts(4, seed=4), cfg, torch.Generator().manual_seed(2))
    ids, plen = roll.sequences()
    real = torch.arange(ids.shape[1] - 1)[None, :] < (plen + roll.lengths - 1)[:, None]  # fed tokens
    with torch.no_grad():
        plain = model(ids[:, :-1], with_mtp=False, return_routing=True)
        replayed, _ = token_logprobs(model, roll, replay=True)
    for rec, ref in zip(roll.routing, plain.routing):
        assert rec.shape == ref.shape
        assert torch.equal(rec.sort(-1).values[real], ref.sort(-1).values[real])
    torch.testing.assert_close(replayed, roll.logp, atol=1e-4, rtol=1e-4)
