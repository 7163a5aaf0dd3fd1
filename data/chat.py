"""Chat rendering: messages -> token ids and a loss mask, and the equal Jinja chat template for export.

A conversation renders as `<|bos|>` then, per message, `<|role|> content <|end|>`; a generation prompt
appends `<|assistant|>`. The loss mask is 1 on assistant content and its closing `<|end|>`, 0 elsewhere.
Generation stops at `<|end|>` or `<|eos|>`. Content is encoded as plain text: special-token strings
inside content stay text here (the exported Hugging Face tokenizer, like most, would parse them).
"""

from __future__ import annotations

from tokenizers import Tokenizer

from data.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER
from model.errors import MoeforgeError

ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
STOP_IDS = (END, 1)  # <|end|>, <|eos|>

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _check(messages: list[dict], where: str) -> None:
    if not isinstance(messages, list | tuple) or not messages:
        raise MoeforgeError(f"{where}: a conversation must be a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise MoeforgeError(f"{where}: each message needs a role in {sorted(ROLES)} and string content, "
                                f"got {m!r:.200}")


def render(messages: list[dict], tok: Tokenizer, where: str = "chat") -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = assistant content and its `<|end|>`) of a whole conversation."""
    _check(messages, where)
    ids, mask = [BOS], [0]
    for m in messages:
        train = int(m["role"] == "assistant")
        content = tok.encode(m["content"], add_special_tokens=False).ids if m["content"] else []
        ids += [ROLES[m["role"]], *content, END]
        mask += [0] + [train] * (len(content) + 1)
    return ids, mask


def render_prompt(messages: list[dict], tok: Tokenizer, where: str = "chat") -> list[int]:
    """Token ids of `messages` followed by `<|assistant|>`: the model continues with the answer."""
    return render(messages, tok, where)[0] + [ASSISTANT]
