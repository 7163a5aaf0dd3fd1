"""The Gluon Hopper FP8 GEMM against the PyTorch reference, on an sm_90 GPU only (no Gluon interpreter)."""

import pytest
import torch

from model.kernels import gemm, gemm_ref, quant_ref
from tests.kernels.helpers import assert_gemm_close, randn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the Gluon GEMM needs a Hopper (sm_90) GPU",
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
