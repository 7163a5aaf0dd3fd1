"""A deterministic, rank-sharded, resumable loader over a dataset of fixed-length rows.

The loader's state is a GLOBAL sample position P (samples consumed by all ranks together). Sample P is
row `perm_e[P % N]` of epoch `e = P // N`, where `perm_e` is a permutation seeded by `(seed, e)` (the
identity when `shuffle=False`). A step takes the global batch of `batch_size * world` samples at P; rank r
gets the `batch_size` samples at `P + r * batch_size`, and P advances by `batch_size * world`. So the
global sample sequence does not depend on the world size, and a state saved under one world size resumes
under another.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from model.errors import MoeforgeError


class RowDataset(Protocol):
    """What the loader reads: `len()` rows, and a batch of tensors for row indices."""

    def __len__(self) -> int: ...

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]: ...


class Loader:
    """Batches of `batch_size` rows for data-parallel `rank` of `world`; see the module docstring."""

    def __init__(self, dataset: RowDataset, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        if not 0 <= rank < world:
            raise MoeforgeError(f"parallel.dp: rank {rank} outside world size {world}")
        if batch_size < 1:
            raise MoeforgeError(f"trainer.batch_size: must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.num_samples = len(dataset)
        self.position = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perm = (epoch, perm)
        return self._perm[1]

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Dataset rows of global sample positions."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.num_samples)
        if not self.shuffle:
            return offsets
        return np.array([self._permutation(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def global_batch_size(self) -> int:
        return self.batch_size * self.world

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's part of the global batch at the current position; advances the position."""
        start = self.position + self.rank * self.batch_size
        batch = self.dataset.batch(self.rows_at(np.arange(start, start + self.batch_size)))
        self.position += self.global_batch_size()
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One ordered pass from sample 0 (wrapping to fill the last global batch); the same number of
        batches on every rank; does not touch the training position."""
        steps = -(-self.num_samples // self.global_batch_size())
        if max_batches is not None:
            steps = min(steps, max_batches)
        for step in range(steps):
            start = step * self.global_batch_size() + self.rank * self.batch_size
            yield self.dataset.batch(np.arange(start, start + self.batch_size) % self.num_samples)

    def state_dict(self) -> dict:
        """The global position and what it refers to (the same on every rank)."""
        return {"position": self.position, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved global position (any world size or per-rank batch size)."""
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise MoeforgeError(f"data: the checkpoint's data has {state['num_samples']} samples, this data "
                                f"{self.num_samples}; resume with the same data.* and trainer.seq_len")
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._perm = None
