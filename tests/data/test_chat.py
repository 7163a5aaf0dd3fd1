import json

import numpy as np
import pytest

from data.chat import render, render_prompt
from data.config import DataConfig
from data.packing import IGNORE
from data.sft import build_sft_loader, load_conversations, pack_conversations, task_conversations
from data.tokenizer import ASSISTANT, BOS, END, PAD, SYSTEM, USER
from model.errors import MoeforgeError

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "Now 4 and 4?"},
        {"role": "assistant", "content": "It is 8."}]


def test_render_layout_and_loss_mask(tok):
    ids, mask = render(CONV, tok)
    enc = [tok.encode(m["content"]).ids for m in CONV]
    role = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    expect_ids, expect_mask = [BOS], [0]
    for m, e in zip(CONV, enc):
        a = int(m["role"] == "assistant")
        expect_ids += [role[m["role"]], *e, END]
        expect_mask += [0] + [a] * (len(e) + 1)
    assert (ids, mask) == (expect_ids, expect_mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "5It is 8."
    assert render_prompt(CONV[:2], tok) == render(CONV[:2], tok)[0] + [ASSISTANT]


def test_render_rejects_bad_messages(tok):
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        with pytest.raises(MoeforgeError, match="^chat: "):
            render(bad, tok)


def reference_labels(ids_rows, docs, masks):
    out = []
    for ids, doc, mask in zip(ids_rows, docs, masks):
        out.append([ids[i + 1] if i + 1 < len(ids) and doc[i + 1] == doc[i] and mask[i + 1] else IGNORE
                    for i in range(len(ids))])
    return out


@pytest.mark.parametrize("packed", [True, False])
def test_sft_rows_labels_and_loss_mask(tok, packed, rng):
    convs = [[{"role": "user", "content": "q" * int(rng.integers(1, 20))},
              {"role": "assistant", "content": "a" * int(rng.integers(1, 20))}] for _ in range(9)]
    encoded = [render(c, tok) for c in convs]
    rows = pack_conversations(encoded, 48, packed=packed)
    assert len(rows) == (9 if not packed else len(rows)) and (len(rows) < 9) == packed
    b = rows.batch(np.arange(len(rows)))
    assert set(b) == {"input_ids", "doc_ids", "labels", "loss_mask"}
    expect = reference_labels(b["input_ids"].tolist(), b["doc_ids"].tolist(), rows.assistant.tolist())
    assert b["labels"].tolist() == expect
    assert b["loss_mask"].tolist() == (b["labels"] != IGNORE).float().tolist()
    flat = [t for r in b["input_ids"].tolist() for t in r if t != PAD]
    assert flat == [t for ids, _ in encoded for t in ids]  # every conversation once, in order, whole
    targets = b["labels"][b["labels"] != IGNORE].tolist()
    assert targets == [t for ids, m in encoded for t, k in zip(ids, m) if k]


def test_long_conversations_skipped_or_error(tok):
    short, long = render(CONV[:3], tok), render(CONV, tok)
    assert len(pack_conversations([short, long], len(short[0]))) == 1
    with pytest.raises(MoeforgeError, match="trainer.seq_len"):
        pack_conversations([long], 5)


def test_load_conversations_and_loader(tmp_path, tok):
    rows = [{"messages": CONV}, {"messages": CONV[:3]}, {"messages": []}] * 4
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="files", path=str(tmp_path / "sft.jsonl"), cache_dir=str(tmp_path / "c"),
                     val_fraction=0.0)
    convs = load_conversations(cfg)
    assert convs == [CONV, CONV[:3]] * 4
    loader = build_sft_loader(convs, tok, seq_len=64, batch_size=2, seed=0)
    assert loader.next_batch()["loss_mask"].shape == (2, 64)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "x", "content": "y"}]}) + "\n")
    with pytest.raises(MoeforgeError, match=r"data.messages_field: .*bad.jsonl row 0"):
        load_conversations(DataConfig(**{**cfg.__dict__, "path": str(tmp_path / "bad.jsonl")}))
    with pytest.raises(MoeforgeError, match="data.messages_field: column 'chat'"):
        load_conversations(DataConfig(**{**cfg.__dict__, "messages_field": "chat"}))


def test_task_conversations():
    recs = [{"prompt": "What is 1 + 1?", "solution": "\\boxed{2}"}]
    assert task_conversations(recs, system="S") == [[{"role": "system", "content": "S"},
                                                     {"role": "user", "content": "What is 1 + 1?"},
                                                     {"role": "assistant", "content": "\\boxed{2}"}]]
