"""Fused Sinkhorn projection of mHC (reference: `model.mhc.sinkhorn`).

The reference runs softmax + eps, one column normalisation and (iters - 1) row/column pairs as separate
element-wise kernels: about 120 launches forward and 300 backward per sublayer, for matrices of N x N = 16
values. Here one program takes a block of matrices and keeps them in registers: one launch forward, one
backward. The backward recomputes, for each normalisation from the last to the first, its input from the
logits (quadratic in the number of steps, trivial at N = 4), so nothing but the logits is saved.

Steps after the softmax: step 0 normalises columns, then odd steps rows and even steps columns.
"""

import torch
import triton
import triton.language as tl

BLOCK = 16  # matrices per program: many programs, since each runs the whole recomputation loop


@triton.jit
def _softmax_eps(x, eps):
    e = tl.exp(x - tl.max(x, axis=2)[:, :, None])
    return e / tl.sum(e, axis=2)[:, :, None] + eps


@triton.jit
def _normalise(m, eps, cols):
    """Step of the Sinkhorn loop: divide by column sums (cols) or row sums (+ eps)."""
    by_col = m / (tl.sum(m, axis=1)[:, None, :] + eps)
    by_row = m / (tl.sum(m, axis=2)[:, :, None] + eps)
    return tl.where(cols, by_col, by_row)


@triton.jit
def _normalise_bwd(m, g, eps, cols):
    """Gradient through y = m / d (d = sums + eps) with respect to m, given dL/dy = g:
    (g - sum(g m) / d) / d along the normalised axis."""
    dc = (tl.sum(m, axis=1) + eps)[:, None, :]
    gc = (g - tl.sum(g * m, axis=1)[:, None, :] / dc) / dc
    dr = (tl.sum(m, axis=2) + eps)[:, :, None]
    gr = (g - tl.sum(g * m, axis=2)[:, :, None] / dr) / dr
    return tl.where(cols, gc, gr)


@triton.jit
def _offsets(M, N: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.arange(0, N)
    offs = rows[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
    return offs, offs < M * N * N


@triton.jit
def _fwd_kernel(x_ptr, out_ptr, M, steps, eps, N: tl.constexpr, BLOCK_M: tl.constexpr):
    offs, mask = _offsets(M, N, BLOCK_M)
    m = _softmax_eps(tl.load(x_ptr + offs, mask=mask, other=0.0), eps)
    for s in range(steps):
        m = _normalise(m, eps, s % 2 == 0)
    tl.store(out_ptr + offs, m, mask=mask)


@triton.jit
def _bwd_kernel(x_ptr, g_ptr, gx_ptr, M, steps, eps, N: tl.constexpr, BLOCK_M: tl.constexpr):
    offs, mask = _offsets(M, N, BLOCK_M)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    for back in range(steps):
        k = steps - 1 - back
        m = _softmax_eps(x, eps)  # the input of step k, recomputed from the logits
        for s in range(k):
            m = _normalise(m, eps, s % 2 == 0)
        g = _normalise_bwd(m, g, eps, k % 2 == 0)
    p = _softmax_eps(x, eps) - eps
    gx = p * (g - tl.sum(g * p, axis=2)[:, :, None])
    tl.store(gx_ptr + offs, gx, mask=mask)


def _launch(kernel, m: int, n: int, *args):
    kernel[(triton.cdiv(m, BLOCK),)](*args, N=n, BLOCK_M=BLOCK, num_warps=1)


class FusedSinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters: int, eps: float):
        x = logits.float().contiguous()
        n = x.shape[-1]
        flat = x.view(-1, n, n)
        out = torch.empty_like(flat)
        steps = 2 * iters - 1
        _launch(_fwd_kernel, flat.shape[0], n, flat, out, flat.shape[0], steps, eps)
        ctx.save_for_backward(flat)
        ctx.meta = (steps, eps, logits.shape, logits.dtype)
        return out.view(logits.shape).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        steps, eps, shape, dtype = ctx.meta
        n = flat.shape[-1]
        g = grad.float().contiguous().view(-1, n, n)
        gx = torch.empty_like(flat)
        _launch(_bwd_kernel, flat.shape[0], n, flat, g, gx, flat.shape[0], steps, eps)
        return gx.view(shape).to(dtype), None, None


def fused_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`model.mhc.sinkhorn` in one kernel each way; logits [..., N, N] with N a power of two."""
    return FusedSinkhorn.apply(logits, int(iters), float(eps))
