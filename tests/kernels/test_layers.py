"""Autograd layers: FP8 linear and grouped expert linear (both recipes), MXFP4 QAT."""

import pytest
import torch

from model.errors import ConfigError, MoeforgeError
from model.kernels import mxfp4
from model.kernels.fp8 import Fp8Recipe, fp8_grouped_linear, fp8_linear
from model.kernels.rowwise import quantize_rowwise, scaled_mm, scaled_mm_ref
from tests.kernels.helpers import DEVICE, GPU, assert_gemm_close, pick, randn, rel

B, S, K, N = pick((2, 48, 256, 384), (4, 2048, 4096, 2048))
E, EN, EK = pick((4, 128, 256), (16, 2048, 4096))
ENDS = pick([100, 100, 230, 280], [496 * (i + 1) for i in range(15)] + [7440])  # _scaled_grouped_mm: x16


def grads(fn, x, w, dy, *extra):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, *extra)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def dense(x, w):
    return x @ w.t()


def grouped_exact(x, w, offs):
    out, start = torch.zeros(x.shape[0], w.shape[1], device=x.device), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out


RECIPES = [Fp8Recipe(), Fp8Recipe(backend="reference"), Fp8Recipe(pow2_scales=True),
           Fp8Recipe(name="fp8_rowwise")]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.name}-{r.backend}-{r.pow2_scales}")
def test_fp8_linear_close_to_fp32(recipe):
    x, w, dy = randn(0, B, S, K), randn(1, N, K, scale=0.02), randn(2, B, S, N)
    got = grads(lambda a, b: fp8_linear(a, b, recipe), x, w, dy)
    want = grads(dense, x, w, dy)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        assert rel(g, r) < 0.06  # two E4M3 roundings per product, see test_gemm


def test_fp8_linear_kernels_equal_reference_backend():
    x, w, dy = randn(3, B, S, K), randn(4, N, K, scale=0.02), randn(5, B, S, N)
    got = grads(lambda a, b: fp8_linear(a, b, Fp8Recipe()), x, w, dy)
    ref = grads(lambda a, b: fp8_linear(a, b, Fp8Recipe(backend="reference")), x, w, dy)
    for g, r in zip(got, ref):
        assert_gemm_close(g, r)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.name}-{r.backend}-{r.pow2_scales}")
def test_fp8_grouped_linear_close_to_fp32(recipe):
    offs = torch.tensor(ENDS, dtype=torch.int32, device=DEVICE)
    m = ENDS[-1] + 20  # trailing padding rows
    x, w, dy = randn(6, m, EK), randn(7, E, EN, EK, scale=0.02), randn(8, m, EN)
    dy[ENDS[-1]:] = 0
    got = grads(lambda a, b: fp8_grouped_linear(a, b, offs, recipe), x, w, dy)
    want = grads(lambda a, b: grouped_exact(a, b, offs), x, w, dy)
    for g, r in zip(got, want):
        assert rel(g, r) < 0.06
    assert (got[0][ENDS[-1]:] == 0).all()


def test_bf16_layer_dtypes():
    x, w = randn(9, S, K).to(torch.bfloat16).requires_grad_(), randn(10, N, K, scale=0.02).requires_grad_()
    y = fp8_linear(x, w, Fp8Recipe(backend="reference"))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_rowwise_scaled_mm_matches_reference():
    a, b = randn(11, 64, K), randn(12, N, K)
    (aq, sa), (bq, sb) = quantize_rowwise(a), quantize_rowwise(b)
    assert sa.shape == (64, 1) and sb.shape == (N, 1)
    out = torch.bfloat16 if GPU else torch.float32  # CUDA row-wise _scaled_mm writes bf16
    ref = scaled_mm_ref(aq, sa, bq, sb, torch.float32)
    torch.testing.assert_close(scaled_mm(aq, sa, bq, sb, out).float(), ref, rtol=2 ** -7,
                               atol=2 ** -8 * ref.abs().max().item())


def test_mxfp4_grid_scales_and_ste():
    w = randn(13, 4, 64, 256, scale=0.02).requires_grad_()
    fq = mxfp4.mxfp4_qat(w)
    g = fq.detach().reshape(-1, 32)
    scale = torch.exp2(torch.floor(torch.log2(w.detach().reshape(-1, 32).abs().amax(1, keepdim=True))) - 2)
    codes = g / scale
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], device=DEVICE)
    assert torch.isin(codes.abs(), grid).all()
    assert rel(fq, w) < 0.2  # 1 mantissa bit: per-value relative error <= 1/4 for normal values
    dy = randn(14, *w.shape)
    fq.backward(dy)
    assert torch.equal(w.grad, dy)  # straight-through estimator
    assert mxfp4.fp8_lossless(fq.detach())
    assert not mxfp4.fp8_lossless(w.detach())


def test_mxfp4_round_half_even():
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -2.9])
    assert mxfp4.round_e2m1(y).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -3.0]
    with pytest.raises(MoeforgeError, match="multiple of 32"):
        mxfp4.mxfp4_fake_quant(torch.zeros(4, 48))


def test_recipe_validation_names_key():
    with pytest.raises(ConfigError, match="precision"):
        Fp8Recipe(name="fp16")
    with pytest.raises(ConfigError, match="precision.backend"):
        Fp8Recipe(backend="cuda")
