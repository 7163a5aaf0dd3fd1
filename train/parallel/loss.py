"""Loss normalised over the GLOBAL batch, so that any split into ranks and microbatches sums to exactly
the single-process loss: token losses / global token count, balance loss x rows / global sequences.

Single process with one micro-batch, `train.losses.lm_and_mtp_loss` + the model's balance loss is the
same number; here every piece is a sum that ranks and microbatches add up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.losses import IGNORE, mtp_labels


@dataclass
class GlobalCounts:
    """Counts over the whole global batch (all data ranks, all microbatches)."""

    tokens: float  # labels != -100
    mtp_tokens: list[float]  # per MTP depth
    sequences: float


def targets(batch: dict[str, torch.Tensor], n_mtp: int) -> torch.Tensor:
    """[B, S, 1 + n_mtp] long: the next-token labels, then the labels of each MTP depth."""
    labels, doc_ids = batch["labels"], batch["doc_ids"]
    return torch.stack([labels] + [mtp_labels(labels, doc_ids, k) for k in range(n_mtp)], dim=-1)


def global_counts(target_BSK: torch.Tensor, group: dist.ProcessGroup | None) -> GlobalCounts:
    """Sum this rank's label counts over the data-parallel `group` (None: this process is the batch)."""
    counts = (target_BSK != IGNORE).sum(dim=(0, 1)).double()
    stats = torch.cat([counts, counts.new_tensor([float(target_BSK.shape[0])])])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    values = stats.tolist()
    return GlobalCounts(values[0], values[1:-1], values[-1])


def token_loss_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    flat = logits_BSV.reshape(-1, logits_BSV.shape[-1]).float()
    return F.cross_entropy(flat, labels_BS.reshape(-1), ignore_index=IGNORE, reduction="sum")


class LossParts:
    """Accumulates the detached, globally normalised loss parts (sum over microbatches and ranks)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float().reshape(())
        self.sums[name] = self.sums[name] + v if name in self.sums else v


def lm_objective(logits: list[torch.Tensor], target_BSK: torch.Tensor, counts: GlobalCounts,
                 mtp_weight: float, parts: LossParts) -> torch.Tensor:
    """CE / global tokens + mtp_weight x mean over depths of (MTP CE / global depth tokens)."""
    lm = token_loss_sum(logits[0], target_BSK[..., 0]) / max(counts.tokens, 1.0)
    parts.add("loss", lm)
    total = lm
    depths = len(logits) - 1
    if depths:
        mtp = sum(token_loss_sum(lg, target_BSK[..., 1 + k]) / max(counts.mtp_tokens[k], 1.0)
                  for k, lg in enumerate(logits[1:])) / depths
        parts.add("mtp_loss", mtp)
        total = total + mtp_weight * mtp
    return total


def sequence_share(rows: int, counts: GlobalCounts) -> float:
    """Weight of a per-sequence mean over `rows` sequences in the global per-sequence mean."""
    return rows / counts.sequences
