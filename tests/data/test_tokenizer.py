import pytest
from tokenizers import Tokenizer, models, trainers
from transformers import AutoTokenizer

from data.chat import render, render_prompt
from data.config import DataConfig
from data.hf_tokenizer import to_hf_tokenizer
from data.sources import make_source
from data.tokenizer import (
    BOS,
    EOS,
    SPECIAL_TOKENS,
    build_tokenizer,
    load_tokenizer,
    sample_texts,
    save_tokenizer,
    train_tokenizer,
)
from model.errors import ConfigError, MoeforgeError

from .conftest import VOCAB

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "2 + 3 = 5. \\boxed{5}"}]


def test_special_ids_and_vocab_size(tok):
    assert tok.get_vocab_size() == VOCAB
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert (BOS, EOS) == (0, 1)


def test_round_trip_and_specials_in_text_stay_text(tok):
    text = "def f(x):\n\treturn x  # héllo 世界 🙂\n<|eos|> <|user|> 12 + 3405 = 3417"
    enc = tok.encode(text)
    assert not set(enc.ids) & set(range(7))
    assert tok.decode(enc.ids) == text
    assert [t for t in enc.tokens if any(c.isdigit() for c in t)] == list("12") + list("3405") + list("3417")


def test_cache_hit_and_key(small_cfg, tok):
    src = make_source(small_cfg)
    again = build_tokenizer(small_cfg, VOCAB, src)
    assert again.to_str() == tok.to_str()
    files = list((small_cfg.cache_root() / "tokenizers").glob("*/tokenizer.json"))
    assert len(files) >= 1
    other = DataConfig(**{**small_cfg.__dict__, "max_bytes": 100_000})
    build_tokenizer(other, VOCAB, make_source(other))
    assert len(list((small_cfg.cache_root() / "tokenizers").glob("*/tokenizer.json"))) == len(files) + 1


def test_sample_texts_is_a_byte_budget():
    docs = [("a", "x" * 10), ("b", "é" * 10), ("c", "z" * 10)]
    out = sample_texts(iter(docs), 15)
    assert out == ["x" * 10, "é" * 2] and sum(len(t.encode()) for t in out) <= 15


def test_load_existing_and_errors(tmp_path, tok, small_cfg):
    path = save_tokenizer(tok, tmp_path / "tok" / "tokenizer.json")
    cfg = DataConfig(**{**small_cfg.__dict__, "tokenizer": str(path.parent)})
    assert build_tokenizer(cfg, VOCAB).to_str() == tok.to_str()
    with pytest.raises(MoeforgeError, match="more than model.vocab_size"):
        build_tokenizer(cfg, VOCAB - 1)
    with pytest.raises(ConfigError, match="data.vocab_size"):
        build_tokenizer(DataConfig(**{**cfg.__dict__, "vocab_size": 1000}), VOCAB)
    with pytest.raises(MoeforgeError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    other = Tokenizer(models.BPE())
    other.train_from_iterator(["some text"], trainers.BpeTrainer(special_tokens=["<|eos|>", "<|bos|>"]))
    other.save(str(tmp_path / "bad.json"))
    with pytest.raises(MoeforgeError, match=r"bad.json.*<\|bos\|> at id 0"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(MoeforgeError, match="cannot load .*garbage.json"):
        load_tokenizer(tmp_path / "garbage.json")


def test_vocab_errors():
    with pytest.raises(MoeforgeError, match="model.vocab_size"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(MoeforgeError, match="data.max_bytes"):
        train_tokenizer(["a tiny sample"], 2000)


def test_hf_tokenizer_matches_chat_rendering(tok, tmp_path):
    hf = to_hf_tokenizer(tok)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    ids, mask = render(MESSAGES, tok)
    out = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask
    prompt = hf.apply_chat_template(MESSAGES[:2], add_generation_prompt=True, return_dict=False)
    assert prompt == render_prompt(MESSAGES[:2], tok)
    hf.save_pretrained(tmp_path / "hf")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.apply_chat_template(MESSAGES, tokenize=True, return_dict=False) == ids
    assert loaded.decode(ids).startswith("<|bos|><|system|>Be brief.<|end|><|user|>")
