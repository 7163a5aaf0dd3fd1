"""Block-scaled FP8 GEMM kernel vs its reference, and the reference vs an fp32 matmul (FP8 error bound)."""

import pytest
import torch

from model.errors import MoeforgeError
from model.kernels import gemm, gemm_ref, quant_ref
from model.kernels.gemm import fp8_gemm
from tests.kernels.helpers import assert_gemm_close, gemm_bound, pick, randn, rel

SHAPES = pick([(70, 200, 300), (64, 128, 512)], [(4096, 4096, 7168), (8192, 2048, 4096)])
CONFIGS = pick([{"BM": 32, "BN": 64}, {"BM": 64, "BN": 256, "SPLIT": 2},
                {"BM": 32, "BN": 32, "PERSISTENT": 1}, {"BM": 32, "BN": 64, "CARRY": 1}],
               [{}, {"SPLIT": 2, "num_stages": 3, "GLUON": 0}, {"BM": 64, "num_warps": 4, "GLUON": 0},
                {"PERSISTENT": 1, "GLUON": 0}, {"CARRY": 1, "GLUON": 0}, {"GLUON": 0}])


def operands(m, n, k, b_block=True, seed=0):
    x, w = randn(seed, m, k), randn(seed + 1, n, k, scale=0.02)
    a, sa = quant_ref.quantize_rows_ref(x)
    b, sb = quant_ref.quantize_blocks_ref(w) if b_block else quant_ref.quantize_rows_ref(w)
    return x, w, a, sa, b, sb


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_block_scaled_gemm_matches_reference(shape, cfg):
    _, _, a, sa, b, sb = operands(*shape)
    c = fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, config=CONFIGS[cfg])
    assert_gemm_close(c, gemm_ref.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("carry", [0, 1])
def test_row_scaled_b_matches_reference(shape, carry):
    """The weight-gradient form: both operands in 1x128 groups along the contraction axis."""
    _, _, a, sa, b, sb = operands(*shape, b_block=False, seed=3)
    c = fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, b_block=False, config=dict(CONFIGS[0], CARRY=carry))
    assert_gemm_close(c, gemm_ref.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32, b_block=False))


def test_bf16_output():
    _, _, a, sa, b, sb = operands(*SHAPES[0], seed=5)
    c = fp8_gemm(a, sa, b, sb, config=CONFIGS[0])
    ref = gemm_ref.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32)
    assert c.dtype == torch.bfloat16
    # one bf16 ulp: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest
    torch.testing.assert_close(c.float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("b_block", [True, False])
def test_reference_within_fp8_error_bound(b_block):
    """Elementwise: |ref - x w^T| <= (u|x| + 2^-10 s_x) |w|^T + |x| (u|w| + 2^-10 s_w)^T + ..., u = 2^-4;
    for Gaussian inputs the relative Frobenius error is about u / sqrt(3) * sqrt(2) ~ 5%, we require < 6%."""
    m, n, k = SHAPES[0]
    x, w, a, sa, b, sb = operands(m, n, k, b_block, seed=7)
    ref = gemm_ref.fp8_gemm_ref(a, sa, b, sb, out_dtype=torch.float32, b_block=b_block)
    exact = x @ w.t()
    sa_full = sa.repeat_interleave(128, 1)[:, :k]
    sb_full = (sb.repeat_interleave(128, 0)[:n] if b_block else sb).repeat_interleave(128, 1)[:, :k]
    assert ((ref - exact).abs() <= gemm_bound(x, w, sa_full, sb_full)).all()
    assert rel(ref, exact) < 0.06


def test_bad_operands_raise():
    _, _, a, sa, b, sb = operands(*SHAPES[0])
    with pytest.raises(MoeforgeError, match="float8_e4m3fn"):
        fp8_gemm(a.float(), sa, b, sb)
    with pytest.raises(MoeforgeError, match="scale shapes"):
        fp8_gemm(a, sa[:, :1], b, sb)
    with pytest.raises(MoeforgeError, match="K-major"):
        fp8_gemm(a, sa, b.t(), sb)
    assert gemm.CONFIG["BM"] >= 64
