"""Data layer: corpora, tokenizer, packing with document ids, a resumable rank-sharded loader, chat
rendering, SFT batches and post-training task generators (see docs/interfaces.md, "Data")."""

from data.build import PretrainData, build_pretrain_data
from data.config import DataConfig
from data.loader import Loader
from data.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer

__all__ = ["DataConfig", "Loader", "PretrainData", "SPECIAL_TOKENS", "build_pretrain_data", "build_tokenizer",
           "load_tokenizer"]
