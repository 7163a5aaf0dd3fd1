"""Language-model losses: next-token cross-entropy and the multi-token-prediction (MTP) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, count: int | None = None
                  ) -> torch.Tensor:
    """Summed cross-entropy (fp32) over positions whose label is not -100, divided by `count` (default: the
    number of such positions here; pass the whole step's count to make accumulated micro-batches exact)."""
    flat = logits_BSV.reshape(-1, logits_BSV.shape[-1]).float()
    total = F.cross_entropy(flat, labels_BS.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return total / (max(count, 1) if count is not None else (labels_BS != IGNORE).sum().clamp(min=1))


def mtp_labels(labels_BS: torch.Tensor, doc_ids_BS: torch.Tensor, depth: int) -> torch.Tensor:
    """Targets of MTP depth `depth` (0-based): position i predicts token i+2+depth, i.e. `labels[i+1+depth]`,
    when position i+1+depth is in the same document as i; -100 elsewhere (and where `labels` is -100)."""
    shift = depth + 1
    out = torch.full_like(labels_BS, IGNORE)
    if shift >= labels_BS.shape[1]:
        return out
    same_doc = doc_ids_BS[:, shift:] == doc_ids_BS[:, :-shift]
    out[:, :-shift] = torch.where(same_doc, labels_BS[:, shift:], IGNORE)
    return out


def label_counts(labels_BS: torch.Tensor, doc_ids_BS: torch.Tensor, depths: int) -> list[int]:
    """[next-token targets, MTP targets of depth 0, 1, ...] in this batch."""
    counts = [int((labels_BS != IGNORE).sum())]
    return counts + [int((mtp_labels(labels_BS, doc_ids_BS, k) != IGNORE).sum()) for k in range(depths)]


def lm_and_mtp_loss(logits_BSV: torch.Tensor, mtp_logits: list[torch.Tensor] | None, labels_BS: torch.Tensor,
                    doc_ids_BS: torch.Tensor, counts: list[int] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(next-token CE, mean over depths of the MTP CE, or None without MTP heads); `counts` as `label_counts`
    of the whole step (default: of this batch) normalises the sums."""
    mtp_logits = mtp_logits or []
    counts = counts or [None] * (1 + len(mtp_logits))
    lm = cross_entropy(logits_BSV, labels_BS, counts[0])
    if not mtp_logits:
        return lm, None
    per_depth = [cross_entropy(lg, mtp_labels(labels_BS, doc_ids_BS, k), counts[1 + k])
                 for k, lg in enumerate(mtp_logits)]
    return lm, torch.stack(per_depth).mean()
