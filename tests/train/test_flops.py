"""The FLOP model against hand-counted numbers on a tiny three-layer config."""

import pytest
import torch

from model.config import CSA, HCA, SLIDING, ModelConfig
from train.flops import FlopModel, attended, doc_lengths, peak_flops


@pytest.fixture
def cfg():
    return ModelConfig(vocab_size=10, hidden_size=8, moe_intermediate_size=6, num_hidden_layers=3,
                       num_attention_heads=2, head_dim=8, q_lora_rank=4, partial_rotary_factor=0.25,
                       num_experts_per_tok=2, n_routed_experts=4, layer_types=[SLIDING, CSA, HCA],
                       mlp_layer_types=["hash_moe", "moe", "moe"], compress_rates={HCA: 8}, hc_mult=2,
                       sliding_window=4, o_groups=1, o_lora_rank=4, index_n_heads=2, index_head_dim=4,
                       index_topk=2, num_nextn_predict_layers=1)


def test_token_macs_hand_counted(cfg):
    # attention projections: d*dc + dc*h*c + d*c + h*c*dg + g*dg*d = 32 + 64 + 64 + 64 + 32
    swa = 256
    csa = swa + 2 * 8 * 16 + (2 * 8 * 8 + 4 * 2 * 4 + 8 * 2)  # + CSA compressor + indexer
    hca = swa + 2 * 8 * 8
    block = 2 * (8 * 16 + 16 + 32 + 16) + (8 * 4 + 3 * 3 * 8 * 6)  # mHC x2 + MoE (gate, 2+1 experts)
    head = 2 * 2 * 8 + 8 * 10
    mtp = (64 + 2 * 64) + swa + block + head
    assert FlopModel(cfg).token_macs() == swa + csa + hca + 3 * block + head + mtp == 5392


def test_attention_counts_what_each_position_attends():
    # positions 1..14 of one document: window min(t, 4); CSA entries t // 4 (<= 2 when sparse); HCA t // 8
    assert attended([14], 4, 0, None).window == 1 + 2 + 3 + 4 * 11
    a = attended([14], 4, 4, 2)
    assert (a.entries, a.candidates) == (0 * 3 + 1 * 4 + 2 * 4 + 2 * 3, 1 * 4 + 2 * 4 + 3 * 3)
    assert attended([14], 4, 8, None).entries == 7
    assert attended([3, 0], 4, 4, None) == attended([3], 4, 4, None)


def test_step_flops_sparse_and_dense(cfg):
    fm = FlopModel(cfg)
    per_key = 2 * 2 * 8
    doc14 = {"swa": per_key * 50, "hca": per_key * (50 + 7), "idx": 2 * (4 + 1) * 21}
    doc3 = 4 * per_key * 6  # three short-window layers + MTP, no complete compression window
    sparse = doc14["swa"] * 2 + doc14["hca"] + per_key * (50 + 18) + doc14["idx"] + doc3
    dense = sparse + per_key * (21 - 18)
    assert fm.attention_macs([14, 3], sparse=True) == sparse
    assert fm.attention_macs([14, 3], sparse=False) == dense
    assert fm.step_flops([14, 3], sparse=True) == 6 * (5392 * 17 + sparse) == 599052


def test_doc_lengths_per_row():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert doc_lengths(ids) == [3, 2, 1, 6]


def test_peak_flops():
    assert peak_flops(torch.device("cpu"), "fp32") is None
    assert peak_flops(torch.device("cpu"), "fp32", override_tflops=2.0) == 2e12


def test_counts_match_the_models_masks():
    """Window keys and causal compressed entries equal what the model's own masks let each query see."""
    from model.layout import SeqLayout

    g = torch.Generator().manual_seed(0)
    doc_ids = torch.cumsum(torch.rand(3, 40, generator=g) < 0.08, dim=1)
    layout = SeqLayout.build(3, 40, torch.device("cpu"), doc_ids)
    lengths = doc_lengths(doc_ids)
    assert int(layout.window_mask(8).sum()) == attended(lengths, 8, 0, None).window
    for rate in (4, 16):
        assert int(layout.entries(rate).visible_BST.sum()) == attended(lengths, 8, rate, None).candidates
