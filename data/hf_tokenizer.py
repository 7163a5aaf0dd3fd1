"""Export: a `transformers.PreTrainedTokenizerFast` with bos/eos/pad and the chat template of data.chat."""

from __future__ import annotations

from tokenizers import Tokenizer

from data.chat import CHAT_TEMPLATE
from data.tokenizer import SPECIAL_TOKENS


def to_hf_tokenizer(tok: Tokenizer):
    """Wrap `tok` for `save_pretrained` (special tokens parsed in text, as Hugging Face users expect)."""
    from transformers import PreTrainedTokenizerFast

    fresh = Tokenizer.from_str(tok.to_str())
    fresh.encode_special_tokens = False
    hf = PreTrainedTokenizerFast(
        tokenizer_object=fresh,
        bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], pad_token=SPECIAL_TOKENS[2],
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf
