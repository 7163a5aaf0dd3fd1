"""E4M3 quantisation kernels vs their PyTorch references (bit-exact), and the references' error bounds."""

import pytest
import torch

from model.errors import MoeforgeError
from model.kernels import quant, quant_ref
from model.kernels.grouping import max_tiles
from tests.kernels.helpers import DEVICE, SUB_E4M3, U_E4M3, assert_same_fp8, pick, randn

MK = pick((96, 200), (4096, 7168))


def wide_range(seed, m, k):
    """Gaussian values spread over 11 decades so that subnormals, saturation and ties all occur."""
    x = randn(seed, m, k) * torch.logspace(-8, 3, k, device=DEVICE)
    x[0, :6] = torch.tensor([0.0, 448.0, -448.0, 1e-30, 3.0, -1e-30], device=DEVICE)  # -1e-30 -> -0.0
    x[1] = 0.0  # an all-zero group
    return x


@pytest.mark.parametrize("pow2", [False, True])
def test_rows_cols_dual_match_reference(pow2):
    x = wide_range(0, *MK)
    q, s = quant.quantize_act(x, pow2=pow2)
    qr, sr = quant_ref.quantize_rows_ref(x, pow2)
    assert_same_fp8(q, qr)
    assert torch.equal(s, sr)
    qt, st = quant.quantize_act(x, pow2=pow2, transpose=True)
    qtr, str_ = quant_ref.quantize_cols_ref(x, pow2)
    assert_same_fp8(qt, qtr)
    assert torch.equal(st, str_)
    dual = quant.quantize_act_dual(x, pow2=pow2)
    for got, want in zip(dual, (qr, sr, qtr, str_)):
        if got.dtype == torch.float8_e4m3fn:
            assert_same_fp8(got, want)
        else:
            assert torch.equal(got, want)


def test_bf16_input_and_strided_input():
    x = randn(1, *MK).to(torch.bfloat16)
    q, s = quant.quantize_act(x)
    qr, sr = quant_ref.quantize_rows_ref(x)
    assert_same_fp8(q, qr)
    xt = randn(2, MK[1], MK[0]).t()  # non-contiguous view
    q, s = quant.quantize_act(xt)
    assert_same_fp8(q, quant_ref.quantize_rows_ref(xt)[0])


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_blocks_match_reference(pow2):
    e, n, k = pick((2, 200, 300), (8, 2048, 4096))
    w = randn(3, e, n, k, scale=0.02)
    q, s, qt = quant.quantize_weight(w, pow2=pow2)
    qr, sr, qtr = quant_ref.quantize_weight_ref(w, pow2=pow2)
    assert_same_fp8(q, qr)
    assert_same_fp8(qt, qtr)
    assert torch.equal(s, sr)
    q2, s2, qt2 = quant.quantize_weight(w[1], pow2=pow2, transpose=False)
    assert_same_fp8(q2, qr[1])
    assert qt2 is None and torch.equal(s2, sr[1])


def test_segment_columns_match_reference():
    m, k = pick((300, 160), (16384, 2048))
    cuts = torch.tensor(pick([0, 100, 100, 230, 290], [0, 3000, 3000, 9001, 16000]), dtype=torch.int32)
    offs = cuts.to(DEVICE)
    x = randn(4, m, k)
    qt, st = quant.quantize_act_segments(x, offs)
    qr, sr = quant_ref.quantize_segments_ref(x, offs)
    assert st.shape == (k, max_tiles(m, offs.numel()))
    assert_same_fp8(qt, qr)
    assert torch.equal(st, sr)


def test_fused_swiglu_quantisation():
    g, u = randn(5, *MK, scale=4.0), randn(6, *MK, scale=4.0)
    h = quant_ref.swiglu_ref(g, u, limit=10.0)
    assert h.abs().max() <= 10.0 * 10.0
    q, s, qt, st = quant.quantize_act_dual(g, up=u, limit=10.0)
    qr, sr, qtr, str_ = quant_ref.quantize_rows_ref(h) + quant_ref.quantize_cols_ref(h)
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    torch.testing.assert_close(st, str_, rtol=1e-6, atol=0)
    # exp() differs in the last bit between libraries; a value may land on the other side of a tie
    for a, b, sc in ((q, qr, sr), (qt, qtr, str_)):
        d = (quant_ref.dequantize_rows(a, sc) - quant_ref.dequantize_rows(b, sc)).abs()
        assert (d > 0).float().mean() < 1e-3
        step = sc.repeat_interleave(128, dim=1)[:, : a.shape[1]] * 2.0 ** -9  # one subnormal step
        assert (d <= 2 * U_E4M3 * quant_ref.dequantize_rows(b, sc).abs() + step).all()


@pytest.mark.parametrize("pow2", [False, True])
def test_reference_error_within_e4m3_bounds(pow2):
    """|dequant(q) - x| <= 2^-4 |x| + 2^-10 scale, scales cover the group (amax / scale <= 448), and
    power-of-two scales are exact powers of two."""
    x = wide_range(7, *MK)
    q, s = quant_ref.quantize_rows_ref(x, pow2)
    full = s.repeat_interleave(128, dim=1)[:, : x.shape[1]]
    err = (quant_ref.dequantize_rows(q, s) - x).abs()
    assert (err <= U_E4M3 * x.abs() + SUB_E4M3 * full).all()
    assert (q.float().abs() <= 448).all()
    if pow2:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    normal = x.abs() >= full * 2.0 ** -6
    rel_err = (err[normal] / x.abs()[normal]).max().item()
    assert rel_err <= U_E4M3, rel_err


def test_kernel_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(MoeforgeError, match="CUDA"):
        quant.quantize_act(torch.zeros(4, 128))
