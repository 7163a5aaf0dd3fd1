"""Parameter counts from a config, built on the meta device (no memory)."""

import torch

from model.config import ModelConfig
from model.transformer import Transformer


def count_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) trainable parameters of the main model, the convention of the V4 report.

    Both exclude the MTP layers. `total` counts everything else (embedding and head included).
    `active` is what one token uses, without the embedding table: every non-expert weight (head included)
    plus `num_experts_per_tok` of the `n_routed_experts` routed experts in each layer. Buffers
    (gate bias, `tid2eid`) are not parameters. V4-Flash: 284.3B / 13.3B; V4-Pro: 1573B / 48.9B.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    total = active = 0
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            continue
        total += p.numel()
        if name == "embed.weight":
            continue
        active += p.numel() * share if ".ffn.experts." in name else p.numel()
    return total, int(round(active))
