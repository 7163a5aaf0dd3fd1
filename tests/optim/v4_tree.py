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


def compressor(rows, c, m):
    """CSA: rows = 2c (two overlapping windows); HCA: rows = c."""
    wkv, wgate = Node(weight=p(rows, D)), Node(weight=p(rows, D))
    return Node(wkv=wkv, wgate=wgate, ape=p(m, rows), norm=Node(weight=p(c)))


def linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


def attention(kind):
    parts = dict(
        wq_a=linear(D, DC), q_norm=Node(weight=p(DC)), wq_b=linear(DC, NH * C), wkv=linear(D, C),
        kv_norm=Node(weight=p(C)), wo_a=linear(NH * C // G, G * DG), wo_b=linear(G * DG, D), attn_sink=p(NH),
    )
    if kind == "hca":
        parts["compressor"] = compressor(C, C, 16)
    if kind == "csa":
        parts["compressor"] = compressor(2 * C, C, 4)
        parts["indexer"] = Node(compressor=compressor(2 * CI, CI, 4), wq_b=linear(DC, NI * CI),
                                weights_proj=linear(D, NI))
    return Node(**parts)


def moe(hash_routed):
    gate = Node(weight=p(E, D))
    if hash_routed:
        gate.register_buffer("tid2eid", torch.randint(0, E, (V, K)))
    else:
        gate.register_buffer("bias", torch.zeros(E))
    shared = Node(w1=linear(D, I_EXP), w2=linear(I_EXP, D), w3=linear(D, I_EXP))
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
        for name, mod in dict(e_proj=linear(D, D), h_proj=linear(D, D),
                              enorm=Node(weight=p(D)), hnorm=Node(weight=p(D)), norm=Node(weight=p(D)),
                              hc_head=mhc(N_HC)).items():
            setattr(mtp, name, mod)
        model.mtp = nn.ModuleList([mtp])
    model.config = SimpleNamespace(o_groups=G, hc_mult=N_HC)
    return model
