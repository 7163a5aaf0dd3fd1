"""Manifold-constrained hyper-connections (mHC): n residual streams mixed around every sublayer."""

import torch
import torch.nn.functional as F
from torch import nn


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax + eps, one column normalisation, then (iters-1) x (row, column) normalisations."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


def project(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn`, on CUDA by the fused kernel (model/kernels/sinkhorn.py: one launch each way instead of
    about 400 small ones per sublayer); the reference elsewhere and inside torch.compile (which fuses it)."""
    n = logits.shape[-1]
    if logits.is_cuda and n & (n - 1) == 0 and not torch.compiler.is_compiling():
        from model.kernels.sinkhorn import fused_sinkhorn

        return fused_sinkhorn(logits, iters, eps)
    return sinkhorn(logits, iters, eps)


def normed_mix(streams_BSND, fn, norm_eps: float) -> torch.Tensor:
    """F.linear(rms_norm(flattened streams), fn) in fp32, as linear(x, fn) / rms(x): the row scale is applied
    to the few mixing logits instead of materialising the normalised [B, S, N*D] copy."""
    flat = streams_BSND.flatten(2).float()
    return F.linear(flat, fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


def weighted_sum(w_BSN: torch.Tensor, streams_BSND: torch.Tensor) -> torch.Tensor:
    """sum_k w[k] X_k -> [B, S, D] in the streams' dtype: a batched [1, N] x [N, D] product in fp32 (never
    under autocast, which would round the residual streams to bf16)."""
    with torch.autocast(streams_BSND.device.type, enabled=False):
        out = torch.matmul(w_BSN.float().unsqueeze(-2), streams_BSND.float()).squeeze(-2)
    return out.to(streams_BSND.dtype)


def hc_pre(streams_BSND, fn, base, scale, n: int, iters: int, hc_eps: float, norm_eps: float):
    """(collapsed input [B,S,D], post weights [B,S,N], residual mix R [B,S,N,N]) of one sublayer."""
    mix = normed_mix(streams_BSND, fn, norm_eps)
    pre_w, post_w, res_w = mix.split([n, n, n * n], dim=-1)
    pre_b, post_b, res_b = base.float().split([n, n, n * n])
    a_pre, a_post, a_res = scale.float().unbind(0)
    pre = torch.sigmoid(pre_w * a_pre + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * a_post + post_b)
    res = project((res_w * a_res + res_b).unflatten(-1, (n, n)), iters, hc_eps)
    return weighted_sum(pre, streams_BSND), post, res


def hc_collapse(streams_BSND, fn, base, scale, hc_eps: float, norm_eps: float):
    """The final collapse of the streams into one [B,S,D] with sigmoid weights."""
    mix = normed_mix(streams_BSND, fn, norm_eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + hc_eps
    return weighted_sum(pre, streams_BSND)


def hc_post(y_BSD: torch.Tensor, streams_BSND: torch.Tensor, post: torch.Tensor, res: torch.Tensor):
    """X'_k = post_k * y + sum_j R[j,k] X_j (residual mix applied transposed, as in the official code)."""
    dtype = streams_BSND.dtype
    with torch.autocast(streams_BSND.device.type, enabled=False):  # the residual stays in its dtype
        mixed = torch.matmul(res.to(dtype).transpose(-1, -2), streams_BSND)
    return post.to(dtype).unsqueeze(-1) * y_BSD.unsqueeze(-2) + mixed


class HyperConnection(nn.Module):
    """Dynamic + static pre/post/residual mixing of one sublayer: `fn` [(2+n)n, nd], `base`, `scale` [3].

    `pre_fn` / `post_fn` are the functions the mixing runs through (`hc_pre`, `hc_post`); a trainer may set
    compiled ones on an instance (train/compile.py) without the model knowing."""

    pre_fn = staticmethod(hc_pre)
    post_fn = staticmethod(hc_post)

    def __init__(self, hidden_size: int, n: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        rows = (2 + n) * n
        self.fn = nn.Parameter(torch.empty(rows, n * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(rows, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def forward(self, streams_BSND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(collapsed input [B,S,D], post weights [B,S,N], residual mix R [B,S,N,N])."""
        return self.pre_fn(streams_BSND, self.fn, self.base, self.scale, self.n, self.iters, self.hc_eps,
                           self.norm_eps)

    def post(self, y_BSD, streams_BSND, post, res) -> torch.Tensor:
        """The sublayer's output `y` written back into the streams (`hc_post`)."""
        return self.post_fn(y_BSD, streams_BSND, post, res)


class HyperHead(nn.Module):
    """Final collapse of the n streams into one with sigmoid weights (no Sinkhorn, no post); `collapse_fn`
    as `HyperConnection.pre_fn`."""

    collapse_fn = staticmethod(hc_collapse)

    def __init__(self, hidden_size: int, n: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(n, n * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, streams_BSND: torch.Tensor) -> torch.Tensor:
        return self.collapse_fn(streams_BSND, self.fn, self.base, self.scale, self.hc_eps, self.norm_eps)
