"""A tiny module tree with the parameter names and shape rules of docs/interfaces.md (test input).

Layer 0 is a hash-routed HCA layer, layer 1 a learned-routing CSA layer, plus one MTP block; d = 8,
hc_mult = 4, o_groups = 2. Used until/alongside the real model.Transformer.
"""

from types import SimpleNamespace

import torch
from torch import nn

D, N_HC, E, I_EXP, V, K = 8, 4, 4, 5, 16, 2
C, DC, NH, G, DG, CI, NI = 4, 6, 2, 2, 3, 3, 2


class Node(nn.Module):
    """A module whose children are given by keyword: Parameter, Module, or ("buffer", tensor)."""

    def __init__(self, **children):
        super().__init__()
        for name, v in children.items():
            if isinstance(v, tuple):
                self.register_buffer(name, v[1])
            else:
                setattr(self, name, v)


def p(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.1)


def mhc(rows):
    return Node(fn=p(rows, N_HC * D), base=p(rows), scale=p(3 if rows > N_HC else 1))


def attention(kind):
    parts = dict(
        wq_a=nn.Linear(D, DC, bias=False), q_norm=Node(weight=p(DC)), wq_b=nn.Linear(DC, NH * C, bias=False),
        wkv=nn.Linear(D, C, bias=False), kv_norm=Node(weight=p(C)), wo_a=nn.Linear(NH * C // G, G * DG, bias=False),
        wo_b=nn.Linear(G * DG, D, bias=False), attn_sink=p(NH),
    )
    if kind == "hca":
        parts["compressor"] = Node(wkv=Node(weight=p(C, D)), wgate=Node(weight=p(C, D)), ape=p(16, C),
                                   norm=Node(weight=p(C)))
    if kind == "csa":
        parts["compressor"] = Node(wkv=Node(weight=p(2 * C, D)), wgate=Node(weight=p(2 * C, D)), ape=p(4, 2 * C),
                                   norm=Node(weight=p(C)))
        parts["indexer"] = Node(
            compressor=Node(wkv=Node(weight=p(2 * CI, D)), wgate=Node(weight=p(2 * CI, D)), ape=p(4, 2 * CI),
                            norm=Node(weight=p(CI))),
            wq_b=nn.Linear(DC, NI * CI, bias=False), weights_proj=nn.Linear(D, NI, bias=False),
        )
    return Node(**parts)


def moe(hash_routed):
    gate = Node(weight=p(E, D))
    if hash_routed:
        gate.register_buffer("tid2eid", torch.randint(0, E, (V, K)))
    else:
        gate.register_buffer("bias", torch.zeros(E))
    shared = Node(w1=nn.Linear(D, I_EXP, bias=False), w2=nn.Linear(I_EXP, D, bias=False),
                  w3=nn.Linear(D, I_EXP, bias=False))
    experts = Node(w1=p(E, I_EXP, D), w2=p(E, D, I_EXP), w3=p(E, I_EXP, D))
    return Node(gate=gate, experts=experts, shared_experts=shared)


def block(kind, hash_routed):
    rows = (2 + N_HC) * N_HC
    return Node(hc_attn=mhc(rows), hc_ffn=mhc(rows), attn_norm=Node(weight=p(D)), ffn_norm=Node(weight=p(D)),
                attn=attention(kind), ffn=moe(hash_routed))


def v4_tree(with_mtp: bool = True) -> nn.Module:
    """The whole tiny tree; `model.config.o_groups` is set as the real model's config would be."""
    model = Node(
        embed=Node(weight=p(V, D)),
        layers=nn.ModuleList([block("hca", True), block("csa", False)]),
        norm=Node(weight=p(D)), head=Node(weight=p(V, D)), hc_head=mhc(N_HC),
    )
    if with_mtp:
        mtp = block("sliding", False)
        for name, mod in dict(e_proj=nn.Linear(D, D, bias=False), h_proj=nn.Linear(D, D, bias=False),
                              enorm=Node(weight=p(D)), hnorm=Node(weight=p(D)), norm=Node(weight=p(D)),
                              hc_head=mhc(N_HC)).items():
            setattr(mtp, name, mod)
        model.mtp = nn.ModuleList([mtp])
    model.config = SimpleNamespace(o_groups=G, hc_mult=N_HC)
    return model
