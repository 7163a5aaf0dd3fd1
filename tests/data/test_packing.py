import numpy as np
import torch

from data.packing import IGNORE, doc_ids_of, next_token_labels, pack, pretrain_batch
from data.tokenizer import BOS, EOS, PAD


def reference_rows(docs, seq_len):
    """Plain reference: the whole stream, cut, the last row padded."""
    stream = [t for d in docs for t in [BOS, *d, EOS]]
    rows = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    rows[-1] = rows[-1] + [PAD] * (seq_len - len(rows[-1]))
    return rows


def reference_doc_ids_labels(row):
    """Plain reference, one row: docs end at eos; padding is its own doc; labels stay in the doc."""
    doc_ids, d = [], 0
    for i in range(len(row)):
        if i > 0 and row[i - 1] == EOS:
            d += 1
        doc_ids.append(d)
    labels = []
    for i in range(len(row)):
        ok = i + 1 < len(row) and doc_ids[i + 1] == doc_ids[i] and row[i] != PAD and row[i + 1] != PAD
        labels.append(row[i + 1] if ok else IGNORE)
    return doc_ids, labels


def random_docs(rng, n, max_len, vocab=300):
    return [rng.integers(7, vocab, size=rng.integers(0, max_len)).tolist() for _ in range(n)]


def test_pack_matches_reference(rng):
    for seq_len in (8, 33):
        docs = random_docs(rng, 20, 50)
        rows = [r.tolist() for r in pack(docs, seq_len)]
        assert rows == reference_rows(docs, seq_len)


def test_doc_ids_and_labels_match_reference(rng):
    docs = random_docs(rng, 30, 40)
    rows = np.stack(list(pack(docs, 24)))
    batch = pretrain_batch(torch.from_numpy(rows.astype(np.uint16)))
    assert all(v.dtype == torch.long and v.shape == rows.shape for v in batch.values())
    for r, row in enumerate(rows.tolist()):
        doc_ids, labels = reference_doc_ids_labels(row)
        assert batch["doc_ids"][r].tolist() == doc_ids
        assert batch["labels"][r].tolist() == labels


def test_long_document_is_split_into_pieces():
    doc = list(range(10, 29))  # 21 tokens with bos/eos
    rows = [torch.from_numpy(r)[None] for r in pack([doc, [7, 8]], 8)]
    assert len(rows) == 4
    assert rows[0][0, 0] == BOS and rows[2][0].tolist()[-4:] == [EOS, BOS, 7, 8]
    for r in rows[:2]:  # a piece is one document, and its last position has no label
        assert doc_ids_of(r).unique().tolist() == [0]
        assert next_token_labels(r, doc_ids_of(r))[0, -1] == IGNORE
    last = pretrain_batch(rows[3])
    assert last["input_ids"][0].tolist() == [EOS] + [PAD] * 7
    assert last["doc_ids"][0].tolist() == [0] + [1] * 7
    assert (last["labels"] == IGNORE).all()


def test_labels_respect_extra_keep_mask(rng):
    tokens = torch.from_numpy(rng.integers(7, 100, size=(3, 16)))
    doc_ids = torch.zeros_like(tokens)
    keep = torch.from_numpy(rng.random((3, 16)) < 0.5)
    labels = next_token_labels(tokens, doc_ids, keep)
    expect = torch.where(keep[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE))
    assert torch.equal(labels[:, :-1], expect) and (labels[:, -1] == IGNORE).all()
