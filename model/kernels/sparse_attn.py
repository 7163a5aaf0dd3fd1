"""Triton forward and backward of the V4 attention core (reference: `model.sparse_attention.attend`).

Each query t attends to its sliding window (keys t - j, 0 <= j < min(window, pos[t] + 1), pos = doc-local
position) plus compressed entries: an index list per query (CSA top-k, -1 = unused) or a contiguous range
first[t] .. first[t] + nvis[t] - 1 (HCA: every visible entry). All heads share one K=V row, so one program
takes every head of a query (MQA style: [heads, C] x [C, keys] on the tensor cores) and walks the gathered
key blocks with an online softmax that starts from the per-head sink (denominator only). Memory is linear in
the sequence: nothing but the output, the log-sum-exp [B, S, H] and fp32 key gradients is stored.

The backward recomputes probabilities from the saved log-sum-exp. A query-major kernel computes dq (and adds
CSA entry gradients with fp32 atomics: top-k lists have no contiguous inverse); a key-major kernel computes
the K=V gradient of window rows and HCA entries from the contiguous run of queries that see each key block.
"""

import torch
import triton
import triton.language as tl

from model.errors import MoeforgeError

from .runtime import cdiv, interpreting

NO_ENTRIES, INDEXED, RANGE = 0, 1, 2


@triton.jit
def _load_rows(src, rows, ok, offs_c, C):
    """Rows src[rows] -> [BN, BC] (zeros where not ok or past C)."""
    ptrs = src + rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_c[None, :] < C), other=0.0)


@triton.jit
def _fwd_block(q, k, ok, m, l_sum, acc, scale, PREC: tl.constexpr):
    """One key block of the online softmax: updated (running max, denominator, unnormalised output)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision=PREC)
    return m_new, l_sum, acc


@triton.jit
def _bwd_block(q, do, k, ok, lse, delta, hmask, dq, dsrc, rows, offs_c, C, scale,
               PREC: tl.constexpr, ATOMIC: tl.constexpr):
    """One key block of the query-major backward: returns dq; with ATOMIC also adds the block's K=V
    gradient into dsrc[rows] (CSA entries: the only keys without a key-major pass)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    live = ok[None, :] & hmask[:, None]
    p = tl.where(live, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(k), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
    if ATOMIC:
        dk = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
        ptrs = dsrc + rows.to(tl.int64)[:, None] * C + offs_c[None, :]
        tl.atomic_add(ptrs, dk, mask=ok[:, None] & (offs_c[None, :] < C), sem="relaxed")
    return dq


@triton.jit
def _entry_rows(idx_ptr, first, n, nvis, K, MODE: tl.constexpr):
    """(rows, ok) of the compressed entries n (a block of list slots or range offsets)."""
    if MODE == 1:
        listed = tl.load(idx_ptr + n, mask=n < K, other=-1)
        rows = tl.maximum(listed, 0)
        ok = listed >= 0
    else:
        rows = first + n
        ok = n < nvis
    return rows, ok


@triton.jit
def _query_setup(pos_ptr, first_ptr, nvis_ptr, S, H, K,
                 MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's query (row bs = b * S + t), its heads and its key counts (all tensors)."""
    bs = tl.program_id(0).to(tl.int64)
    b = bs // S
    t = bs - b * S
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    pos = tl.load(pos_ptr + bs)
    if MODE == 2:
        first = tl.load(first_ptr + bs)
        nvis = tl.load(nvis_ptr + bs)
        n_ent = nvis
    else:
        first = pos * 0
        nvis = pos * 0
        n_ent = pos * 0 + (K if MODE == 1 else 0)
    return bs, b, t, offs_h, offs_c, offs_h < H, pos, first, nvis, n_ent


@triton.jit
def _fwd_kernel(q_ptr, kv_ptr, cmp_ptr, idx_ptr, first_ptr, nvis_ptr, pos_ptr, sink_ptr, o_ptr, lse_ptr,
                S, T, H, C, K, scale,
                WINDOW: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    bs, b, t, offs_h, offs_c, hmask, pos, first, nvis, n_ent = _query_setup(
        pos_ptr, first_ptr, nvis_ptr, S, H, K, MODE, BLOCK_H, BLOCK_C)
    qmask = hmask[:, None] & (offs_c[None, :] < C)
    q_off = (bs * H + offs_h)[:, None] * C + offs_c[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    m = tl.load(sink_ptr + offs_h, mask=hmask, other=0.0).to(tl.float32)  # the sink: exp(sink - m) = 1
    l_sum = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    n_win = tl.minimum(pos + 1, WINDOW)
    for j0 in range(0, n_win, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < n_win
        rows = b * S + tl.where(ok, t - j, t)
        k = _load_rows(kv_ptr, rows, ok, offs_c, C)
        m, l_sum, acc = _fwd_block(q, k, ok, m, l_sum, acc, scale, PREC)
    for n0 in range(0, n_ent, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        rows, ok = _entry_rows(idx_ptr + bs * K, first, n, nvis, K, MODE)
        k = _load_rows(cmp_ptr, b * T + rows, ok, offs_c, C)
        m, l_sum, acc = _fwd_block(q, k, ok, m, l_sum, acc, scale, PREC)
    tl.store(o_ptr + q_off, (acc / l_sum[:, None]).to(o_ptr.dtype.element_ty), mask=qmask)
    tl.store(lse_ptr + bs * H + offs_h, m + tl.log(l_sum), mask=hmask)


@triton.jit
def _dq_kernel(q_ptr, kv_ptr, cmp_ptr, idx_ptr, first_ptr, nvis_ptr, pos_ptr, do_ptr, lse_ptr, delta_ptr,
               dq_ptr, dkv_ptr, dcmp_ptr,
               S, T, H, C, K, scale,
               WINDOW: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    bs, b, t, offs_h, offs_c, hmask, pos, first, nvis, n_ent = _query_setup(
        pos_ptr, first_ptr, nvis_ptr, S, H, K, MODE, BLOCK_H, BLOCK_C)
    qmask = hmask[:, None] & (offs_c[None, :] < C)
    q_off = (bs * H + offs_h)[:, None] * C + offs_c[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=qmask, other=0.0)
    lse = tl.load(lse_ptr + bs * H + offs_h, mask=hmask, other=0.0)
    delta = tl.load(delta_ptr + bs * H + offs_h, mask=hmask, other=0.0)
    dq = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    n_win = tl.minimum(pos + 1, WINDOW)
    for j0 in range(0, n_win, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        ok = j < n_win
        rows = b * S + tl.where(ok, t - j, t)
        k = _load_rows(kv_ptr, rows, ok, offs_c, C)
        dq = _bwd_block(q, do, k, ok, lse, delta, hmask, dq, dkv_ptr, rows, offs_c, C, scale, PREC, False)
    for n0 in range(0, n_ent, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        rows, ok = _entry_rows(idx_ptr + bs * K, first, n, nvis, K, MODE)
        k = _load_rows(cmp_ptr, b * T + rows, ok, offs_c, C)
        dq = _bwd_block(q, do, k, ok, lse, delta, hmask, dq, dcmp_ptr, b * T + rows, offs_c, C, scale,
                        PREC, MODE == 1)
    tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit
def _dkv_kernel(q_ptr, src_ptr, do_ptr, lse_ptr, delta_ptr, pos_ptr, first_ptr, nvis_ptr, qlo_ptr, qhi_ptr,
                dsrc_ptr, S, NK, H, C, NB, scale, QCHUNK,
                WINDOW: tl.constexpr, RANGE: tl.constexpr, PREC: tl.constexpr, BLOCK_Q: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-major K=V gradient of one block of contiguous keys (window rows of kv, or HCA entries) from
    the queries qlo .. qhi of its block (one QCHUNK slice of them per program on axis 1)."""
    pid = tl.program_id(0)
    b = (pid // NB).to(tl.int64)
    r = (pid % NB) * BLOCK_N + tl.arange(0, BLOCK_N)
    lo = tl.load(qlo_ptr + pid) + tl.program_id(1) * QCHUNK
    hi = tl.minimum(tl.load(qhi_ptr + pid), lo + QCHUNK)
    if lo < hi:
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c[None, :] < C
        rok = r < NK
        k = _load_rows(src_ptr, b * NK + r, rok, offs_c, C)
        mq = tl.arange(0, BLOCK_Q * BLOCK_H) // BLOCK_H
        mh = tl.arange(0, BLOCK_Q * BLOCK_H) % BLOCK_H
        dk = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for t0 in range(lo, hi, BLOCK_Q):
            t = t0 + mq
            row = b * S + t
            if RANGE:
                f = tl.load(first_ptr + row, mask=t < hi, other=0)[:, None]
                nv = tl.load(nvis_ptr + row, mask=t < hi, other=0)[:, None]
                vis = (r[None, :] >= f) & (r[None, :] < f + nv)
            else:
                d = t[:, None] - r[None, :]
                vis = (d >= 0) & (d < WINDOW) & (d <= tl.load(pos_ptr + row, mask=t < hi, other=0)[:, None])
            for h0 in range(0, H, BLOCK_H):
                live = (t < hi) & (h0 + mh < H)
                rh = row * H + h0 + mh
                off = rh[:, None] * C + offs_c[None, :]
                q = tl.load(q_ptr + off, mask=live[:, None] & cmask, other=0.0)
                do = tl.load(do_ptr + off, mask=live[:, None] & cmask, other=0.0)
                lse = tl.load(lse_ptr + rh, mask=live, other=0.0)
                delta = tl.load(delta_ptr + rh, mask=live, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
                p = tl.where(vis & live[:, None] & rok[None, :], tl.exp(s - lse[:, None]), 0.0)
                ds = p * (tl.dot(do, tl.trans(k), input_precision=PREC) - delta[:, None])
                dk += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
        ptrs = dsrc_ptr + (b * NK + r)[:, None] * C + offs_c[None, :]
        tl.atomic_add(ptrs, dk, mask=rok[:, None] & cmask, sem="relaxed")


def _launch_config(h: int, c: int):
    """Query-major kernels: (BLOCK_H, BLOCK_C, BLOCK_N, num_warps); all heads in one program up to 32."""
    block_c = max(16, triton.next_power_of_2(c))
    block_h = min(max(16, triton.next_power_of_2(h)), 32 if block_c <= 512 else 16)
    if interpreting():
        return block_h, block_c, 16, 1
    return block_h, block_c, 32 if block_c >= 256 else 64, 8 if block_c >= 256 else 4


def _dkv_config(h: int, c: int):
    """Key-major kernel: (BLOCK_Q, BLOCK_H, BLOCK_C, BLOCK_N, QCHUNK, num_warps); BLOCK_Q queries x
    BLOCK_H heads form the rows of each step (more heads: a loop over head blocks)."""
    block_c = max(16, triton.next_power_of_2(c))
    rows = 16 if interpreting() else (32 if block_c >= 256 else 64)
    block_h = min(triton.next_power_of_2(h), rows)
    block_q = rows // block_h
    if interpreting():
        return block_q, block_h, block_c, 16, 64, 1
    return block_q, block_h, block_c, 32 if block_c >= 256 else 64, 1024, 8 if block_c >= 256 else 4


def _block_ranges(lo_BN: torch.Tensor, hi_BN: torch.Tensor, block: int):
    """Per key block of `block` rows: (first query, one past the last) over its rows -> int32 [B, NB]."""
    b, n = lo_BN.shape
    pad = cdiv(n, block) * block - n
    lo = torch.nn.functional.pad(lo_BN, (0, pad), value=torch.iinfo(torch.int32).max)
    hi = torch.nn.functional.pad(hi_BN, (0, pad), value=0)
    lo, hi = lo.view(b, -1, block).amin(-1), hi.view(b, -1, block).amax(-1)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


def window_ranges(b: int, s: int, window: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries that may see window key r: r .. r + window - 1 (the kernel masks documents)."""
    r = torch.arange(s, device=device).expand(b, s)
    return _block_ranges(r, (r + window).clamp(max=s), block)


def entry_ranges(first_BS: torch.Tensor, nvis_BS: torch.Tensor, t: int, block: int):
    """Queries that see entry e: first[t] <= e < first[t] + nvis[t]. Both bounds are nondecreasing in t
    (documents are packed in order), so each entry's queries are one contiguous run."""
    e = torch.arange(t, device=first_BS.device).expand(first_BS.shape[0], t).contiguous()
    lo = torch.searchsorted((first_BS + nvis_BS).contiguous(), e, right=True)
    hi = torch.searchsorted(first_BS.contiguous(), e, right=True)
    empty = lo >= hi
    lo = lo.masked_fill(empty, torch.iinfo(torch.int32).max)
    return _block_ranges(lo, hi.masked_fill(empty, 0), block)


def _dkv(q, src, d_out, lse, delta, pos, first, nvis, window: int, ranged: bool, scale: float, prec: str):
    """fp32 K=V gradient of `src` (kv rows, or HCA entries when `ranged`) from the key-major kernel."""
    b, s, h, c = q.shape
    n_keys = src.shape[1]
    bq, bh, bc, bn, qchunk, warps = _dkv_config(h, c)
    if ranged:
        lo, hi = entry_ranges(first, nvis, n_keys, bn)
        chunks = cdiv(s, qchunk)
    else:
        lo, hi = window_ranges(b, s, window, bn, q.device)
        chunks = cdiv(bn + window, qchunk)
    out = torch.zeros(src.shape, dtype=torch.float32, device=q.device)
    nb = lo.shape[1]
    if nb == 0:
        return out
    _dkv_kernel[(b * nb, chunks)](q, src, d_out, lse, delta, pos, first, nvis, lo, hi, out,
                                  s, n_keys, h, c, nb, scale, qchunk, WINDOW=window, RANGE=ranged,
                                  PREC=prec, BLOCK_Q=bq, BLOCK_H=bh, BLOCK_C=bc, BLOCK_N=bn, num_warps=warps)
    return out


class _Entries:
    """How a layer's compressed entries are given: nothing, an index list [B, S, K], or a range."""

    def __init__(self, comp, idx, first, nvis):
        self.comp = comp if comp is not None and comp.shape[1] > 0 else None
        if self.comp is None:
            self.mode, self.idx, self.first, self.nvis = NO_ENTRIES, None, None, None
        elif idx is not None:
            self.mode, self.idx, self.first, self.nvis = INDEXED, idx.to(torch.int32).contiguous(), None, None
        else:
            if first is None or nvis is None:
                raise MoeforgeError("sparse attention kernel: compressed entries need idx or first/nvis")
            self.mode, self.idx = RANGE, None
            self.first, self.nvis = first.to(torch.int32).contiguous(), nvis.to(torch.int32).contiguous()

    def args(self, kv):
        dummy = torch.zeros(1, dtype=torch.int32, device=kv.device)
        comp = self.comp if self.comp is not None else kv
        idx = self.idx if self.idx is not None else dummy
        first = self.first if self.first is not None else dummy
        nvis = self.nvis if self.nvis is not None else dummy
        t = self.comp.shape[1] if self.comp is not None else 0
        k = self.idx.shape[2] if self.idx is not None else 0
        return comp, idx, first, nvis, t, k


def check_device(*tensors) -> None:
    """MoeforgeError unless the kernels can run on these tensors (CUDA, or CPU under the interpreter)."""
    for x in tensors:
        if x is not None and not x.is_cuda and not interpreting():
            raise MoeforgeError(
                f"model.attn_impl=triton needs CUDA tensors (got {x.device}); use attn_impl=sparse on CPU "
                "or set TRITON_INTERPRET=1 before importing triton"
            )


def _row_dots(a_BSHC: torch.Tensor, b_BSHC: torch.Tensor, budget: int = 1 << 26) -> torch.Tensor:
    """sum_c a * b in fp32 -> [B, S, H], over query chunks so the fp32 copies stay within `budget` values."""
    b, s, h, c = a_BSHC.shape
    out = torch.empty(b, s, h, dtype=torch.float32, device=a_BSHC.device)
    step = max(1, budget // max(b * h * c, 1))
    for lo in range(0, s, step):
        out[:, lo:lo + step] = (a_BSHC[:, lo:lo + step].float() * b_BSHC[:, lo:lo + step].float()).sum(-1)
    return out


class SparseAttention(torch.autograd.Function):
    """Autograd wrapper of the kernels; see `sparse_attention`."""

    @staticmethod
    def forward(ctx, q, kv, comp, sink, pos, idx, first, nvis, scale, window):
        b, s, h, c = q.shape
        q, kv, pos = q.contiguous(), kv.contiguous(), pos.to(torch.int32).contiguous()
        comp = comp.contiguous() if comp is not None else None
        ent = _Entries(comp, idx, first, nvis)
        cmp_t, idx_t, first_t, nvis_t, t, k = ent.args(kv)
        out = torch.empty_like(q)
        lse = torch.empty(b, s, h, dtype=torch.float32, device=q.device)
        bh, bc, bn, warps = _launch_config(h, c)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        grid = (b * s, cdiv(h, bh))
        _fwd_kernel[grid](q, kv, cmp_t, idx_t, first_t, nvis_t, pos, sink.float().contiguous(), out, lse,
                          s, t, h, c, k, scale, WINDOW=window, MODE=ent.mode, PREC=prec,
                          BLOCK_H=bh, BLOCK_C=bc, BLOCK_N=bn, num_warps=warps)
        ctx.save_for_backward(q, kv, cmp_t, idx_t, first_t, nvis_t, pos, sink, out, lse)
        comp_meta = (comp.shape, comp.dtype) if comp is not None else None
        ctx.meta = (scale, window, ent.mode, t, k, comp_meta, prec)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, _d_lse):
        q, kv, cmp_t, idx_t, first_t, nvis_t, pos, sink, out, lse = ctx.saved_tensors
        scale, window, mode, t, k, comp_meta, prec = ctx.meta
        b, s, h, c = q.shape
        d_out = d_out.contiguous()
        delta = _row_dots(d_out, out)
        dq = torch.empty_like(q)
        dcmp = torch.zeros(cmp_t.shape, dtype=torch.float32, device=kv.device) if mode == INDEXED else kv
        bh, bc, bn, warps = _launch_config(h, c)
        _dq_kernel[(b * s, cdiv(h, bh))](
            q, kv, cmp_t, idx_t, first_t, nvis_t, pos, d_out, lse, delta, dq, kv, dcmp,
            s, t, h, c, k, scale, WINDOW=window, MODE=mode, PREC=prec,
            BLOCK_H=bh, BLOCK_C=bc, BLOCK_N=bn, num_warps=warps)
        dkv = _dkv(q, kv, d_out, lse, delta, pos, first_t, nvis_t, window, False, scale, prec)
        if mode == RANGE:
            dcmp = _dkv(q, cmp_t, d_out, lse, delta, pos, first_t, nvis_t, window, True, scale, prec)
        dsink = -(torch.exp(sink.float() - lse) * delta).sum(dim=(0, 1)).to(sink.dtype)
        dcomp = None
        if comp_meta is not None:  # an empty entry set gets a zero gradient
            shape, dtype = comp_meta
            dcomp = dcmp.to(dtype) if mode != NO_ENTRIES else torch.zeros(shape, dtype=dtype, device=q.device)
        return dq, dkv.to(kv.dtype), dcomp, dsink, None, None, None, None, None, None


def sparse_attention(q_BSHC, kv_BSC, sink_H, pos_BS, window: int, scale: float,
                     comp_BTC=None, idx_BSK=None, first_BS=None, nvis_BS=None, return_lse: bool = False):
    """Window + compressed-entry attention with the sink, K = V -> [B, S, H, C] (differentiable).

    Entries: `idx_BSK` (slots into comp, -1 = unused; CSA) or the range `first_BS`/`nvis_BS` (HCA);
    `comp_BTC=None` for sliding-only layers. `pos_BS` = doc-local positions (the window stops there).
    `return_lse`: also the log-sum-exp [B, S, H] fp32 of each query's scaled logits, sink included (no grad).
    """
    check_device(q_BSHC, kv_BSC, comp_BTC)
    if interpreting() and q_BSHC.dtype != torch.float32:  # the interpreter mishandles bf16 memory
        out, lse = sparse_attention(q_BSHC.float(), kv_BSC.float(), sink_H, pos_BS, window, scale,
                                    comp_BTC.float() if comp_BTC is not None else None, idx_BSK, first_BS,
                                    nvis_BS, return_lse=True)
        out = out.to(q_BSHC.dtype)
    else:
        out, lse = SparseAttention.apply(q_BSHC, kv_BSC, comp_BTC, sink_H, pos_BS, idx_BSK, first_BS, nvis_BS,
                                         float(scale), int(window))
    return (out, lse) if return_lse else out
