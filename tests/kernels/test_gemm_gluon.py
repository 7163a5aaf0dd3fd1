"""The Gluon Hopper FP8 GEMM against the PyTorch reference, on an sm_90 GPU only (no Gluon interpreter)."""

import pytest
import torch

from model.kernels import gemm, gemm_ref, quant_ref
from model.kernels.gemm_gluon import gluon_triton_ok
from tests.kernels.helpers import assert_gemm_close, randn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0) or not gluon_triton_ok(),
    reason="the Gluon GEMM needs a Hopper (sm_90) GPU and the triton it targets",
)

# 8192^3, a v4-small layer (wq_a: 8192 x 512 x 1024), and edges: M, N off the 128 tile, an odd number of
# K steps (the carried loop's tail), K off the 128 group (TMA zero-fills the last step), a single K step
SHAPES = [(8192, 8192, 8192), (8192, 512, 1024), (200, 264, 384), (130, 136, 320), (64, 128, 128)]
CONFIGS = {"carry": {}, "nocarry": {"CARRY": 0}, "bm64": {"BM": 64, "STAGES": 3}, "ws": {"WS": 1},
           "ws-nocarry": {"WS": 1, "CARRY": 0}}
_REF = {}


def operands(m, n, k, seed=11):
    x, w = randn(seed, m, k), randn(seed + 1, n, k, scale=0.02)
    a, sa = quant_ref.quantize_rows_ref(x)
    b, sb = quant_ref.quantize_blocks_ref(w)
    return a, sa, b, sb


def reference(shape):
    """Operands and fp32 reference per shape, computed once. TF32 is exact here: e4m3 values have 3
    mantissa bits, so the products are exact and the sums fp32, as in the fp32 reference."""
    if shape not in _REF:
        a, sa, b, sb = operands(*shape)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ref = gemm_ref.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        _REF[shape] = (a, sa, b, sb, ref)
    return _REF[shape]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_gluon_gemm_matches_reference(shape, cfg):
    from model.kernels.gemm_gluon import fp8_gemm_gluon

    a, sa, b, sb, ref = reference(shape)
    c = fp8_gemm_gluon(a, sa, b, sb, out_dtype=torch.float32, config=CONFIGS[cfg])
    assert_gemm_close(c, ref)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "x".join(map(str, s)))
def test_gluon_bf16_output_and_dispatch(shape):
    """bf16 output (rounded from the fp32 accumulator) and ``fp8_gemm`` on the same operands, whichever
    kernel it dispatches to."""
    from model.kernels.gemm_gluon import fp8_gemm_gluon

    a, sa, b, sb, ref = reference(shape)
    tol = dict(rtol=2 ** -7, atol=2e-3 * ref.abs().max().item())
    torch.testing.assert_close(fp8_gemm_gluon(a, sa, b, sb).float(), ref, **tol)
    torch.testing.assert_close(gemm.fp8_gemm(a, sa, b, sb).float(), ref, **tol)
    every_size = {"GLUON": 1, "GLUON_MIN_GFLOP": 0}
    assert_gemm_close(gemm.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, config=every_size), ref)


# Grouped (per-expert) form: (rows, N, K, cumulative ends). Empty experts first, in the middle and last,
# segments off the 128-row tile, trailing padding rows; N off the 128 tile (B's last tile of an expert reads
# the next expert's rows), K off the 128 group, an odd number of K steps.
GROUPED = [(1000, 256, 640, [0, 100, 100, 230, 517, 517, 900]), (777, 200, 400, [300, 301, 700, 777, 777])]
GROUPED_CONFIGS = {"carry": {}, "ws": {"WS": 1}}
_GREF = {}


def grouped_reference(case):
    if case not in _GREF:
        m, n, k, ends = GROUPED[case]
        offs = torch.tensor(ends, dtype=torch.int32, device="cuda")
        a, sa = quant_ref.quantize_rows_ref(randn(20 + case, m, k))
        w = randn(30 + case, len(ends), n, k, scale=0.02)
        b, sb, _ = quant_ref.quantize_weight_ref(w, transpose=False)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ref = gemm_ref.fp8_grouped_gemm_ref(a, sa, b, sb, offs, out_dtype=torch.float32)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        _GREF[case] = (a, sa, b, sb, offs, ref)
    return _GREF[case]


def _dirty(m, n, dtype):
    """Leave NaNs in the caching allocator's block that the next [m, n] output is likely to get: the kernel
    must write every row (zeros past offs[-1]) without a memset."""
    torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


@pytest.mark.parametrize("case", range(len(GROUPED)))
@pytest.mark.parametrize("cfg", list(GROUPED_CONFIGS))
def test_gluon_grouped_gemm_matches_reference(case, cfg):
    from model.kernels.grouped_gluon import fp8_grouped_gemm_gluon

    a, sa, b, sb, offs, ref = grouped_reference(case)
    _dirty(*ref.shape, torch.float32)
    c = fp8_grouped_gemm_gluon(a, sa, b, sb, offs, out_dtype=torch.float32, config=GROUPED_CONFIGS[cfg])
    assert_gemm_close(c, ref)
    assert (c[GROUPED[case][3][-1]:] == 0).all()


@pytest.mark.parametrize("case", range(len(GROUPED)))
def test_gluon_grouped_bf16_and_dispatch(case, monkeypatch):
    """bf16 output, and ``fp8_grouped_gemm`` handing the product to the Gluon kernel at threshold 0."""
    from model.kernels import grouped_gemm, grouped_gluon

    a, sa, b, sb, offs, ref = grouped_reference(case)
    tol = dict(rtol=2 ** -7, atol=2e-3 * ref.abs().max().item())
    _dirty(*ref.shape, torch.bfloat16)
    torch.testing.assert_close(grouped_gluon.fp8_grouped_gemm_gluon(a, sa, b, sb, offs).float(), ref, **tol)
    calls = []
    kernel = grouped_gluon.fp8_grouped_gemm_gluon
    monkeypatch.setattr(grouped_gluon, "fp8_grouped_gemm_gluon",
                        lambda *x, **kw: calls.append(1) or kernel(*x, **kw))
    every_size = {"GLUON": 1, "GLUON_GROUPED": 1, "GLUON_MIN_GFLOP": 0}
    c = grouped_gemm.fp8_grouped_gemm(a, sa, b, sb, offs, config=every_size)
    assert calls == [1]
    torch.testing.assert_close(c.float(), ref, **tol)
    assert (c[GROUPED[case][3][-1]:] == 0).all()
