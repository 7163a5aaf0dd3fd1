import numpy as np
import pytest
import torch

from data.loader import Loader
from model.errors import MoeforgeError


class Rows:
    """A dataset whose row i is [i, i, ...] (real rows, so batches show which samples were read)."""

    def __init__(self, n, seq_len=4):
        self.n, self.seq_len = n, seq_len

    def __len__(self):
        return self.n

    def batch(self, idx):
        t = torch.as_tensor(np.repeat(np.asarray(idx)[:, None], self.seq_len, axis=1)).long()
        return {"input_ids": t, "doc_ids": torch.zeros_like(t), "labels": t}


def ids(batch):
    return batch["input_ids"][:, 0].tolist()


def stream(loader, steps):
    return [ids(loader.next_batch()) for _ in range(steps)]


def test_deterministic_for_seed_and_covers_each_epoch():
    a, b, c = (Loader(Rows(20), 4, seed=s) for s in (3, 3, 4))
    sa = stream(a, 10)
    assert sa == stream(b, 10) and sa != stream(c, 10)
    flat = [x for batch in sa for x in batch]
    assert sorted(flat[:20]) == list(range(20)) == sorted(flat[20:40])
    assert flat[:20] != flat[20:40]  # each epoch reshuffled
    assert a.state_dict()["epoch"] == 2


def test_rank_shards_union_is_the_single_rank_stream():
    single = stream(Loader(Rows(37), 6, seed=1), 9)
    per_rank = [stream(Loader(Rows(37), 2, seed=1, rank=r, world=3), 9) for r in range(3)]
    for step in range(9):
        parts = [per_rank[r][step] for r in range(3)]
        assert sum(parts, []) == single[step]
        if step < 6:  # within one epoch the ranks never share a sample
            assert len(set(sum(parts, []))) == 6


def test_resume_under_another_world_size():
    ref = Loader(Rows(29), 4, seed=7)
    full = stream(ref, 12)
    first = Loader(Rows(29), 2, seed=7, rank=0, world=2)
    stream(first, 5)
    state = first.state_dict()
    assert state["position"] == 20
    resumed = [Loader(Rows(29), 1, seed=0, rank=r, world=4) for r in range(4)]
    for loader in resumed:
        loader.load_state_dict(state)
    for step in range(5, 12):
        assert sum((ids(loader.next_batch()) for loader in resumed), []) == full[step]


def test_eval_batches_equal_count_per_rank_and_cover_all():
    loaders = [Loader(Rows(11), 2, rank=r, world=2, shuffle=False) for r in range(2)]
    batches = [[ids(b) for b in loader.eval_batches()] for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == 3
    seen = {x for per_rank in batches for b in per_rank for x in b}
    assert seen == set(range(11))
    assert loaders[0].position == 0
    assert len(list(loaders[0].eval_batches(max_batches=1))) == 1


def test_errors():
    loader = Loader(Rows(10), 2)
    with pytest.raises(MoeforgeError, match="same data"):
        loader.load_state_dict({"position": 4, "seed": 0, "num_samples": 11})
    with pytest.raises(MoeforgeError, match="rank 2"):
        Loader(Rows(10), 2, rank=2, world=2)
    with pytest.raises(MoeforgeError, match="trainer.batch_size"):
        Loader(Rows(10), 0)
