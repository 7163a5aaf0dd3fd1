"""The dense CSA training phase (every visible entry) before the indexer's top-k takes over."""

import pytest
import torch
from v4_test_helpers import randomize_ours_, small_model_config

from model import Transformer

S, C, H = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


@pytest.mark.parametrize("impl", ["dense", "sparse"])
def test_dense_phase_attends_to_every_visible_entry(impl):
    model = Transformer(small_model_config([S, C, H], attn_impl=impl))
    randomize_ours_(model, 3)
    unlimited = Transformer(small_model_config([S, C, H], attn_impl=impl, index_topk=10_000))
    unlimited.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 72), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.set_sparse_attention(False)
        assert model.config.indexer_loss_mode == "dense"
        torch.testing.assert_close(model(ids).logits, unlimited(ids).logits, rtol=0, atol=1e-5)
        model.set_sparse_attention(True)
        assert model.config.indexer_loss_mode == "sparse"
        assert (model(ids).logits - unlimited(ids).logits).abs().max() > 1e-3  # top-k now drops entries
        model.set_sparse_attention(True, train_indexer=False)
        assert model.config.indexer_loss_mode == "off"
        assert model(ids).indexer_loss is None


def test_indexer_loss_configured_off_stays_off():
    model = Transformer(small_model_config([S, C], indexer_loss_mode="off"))
    model.set_sparse_attention(False)
    assert model.config.indexer_loss_mode == "off"
