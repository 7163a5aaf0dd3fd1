"""Helpers of the training tests: compose the Hydra root config with overrides; tiny-run overrides."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import configs

CONFIG_DIR = str(Path(configs.__file__).resolve().parent)

# A two-layer v4 (sliding + CSA) on a small slice of the built-in corpus: steps of a fraction of a second.
TINY = [
    "model.vocab_size=512", "model.hidden_size=32", "model.num_hidden_layers=2",
    "model.num_attention_heads=2", "model.head_dim=32", "model.q_lora_rank=16", "model.o_lora_rank=16",
    "model.moe_intermediate_size=32", "model.index_head_dim=16", "model.index_n_heads=2",
    "model.index_topk=4", "model.sliding_window=8",
    "model.layer_types=[sliding_attention,compressed_sparse_attention]",
    "model.mlp_layer_types=[hash_moe,moe]",
    "data.max_documents=60", "data.max_bytes=100000",
    "trainer.seq_len=32", "trainer.batch_size=2", "trainer.eval_batches=2", "trainer.log_every=1",
    "optim.warmup_steps=1", "logger.progress=false", "logger.wandb.mode=disabled",
]


@pytest.fixture
def compose_cfg():
    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
        return cfg

    return _compose
