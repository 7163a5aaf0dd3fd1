"""The fused Sinkhorn kernel equals `model.mhc.sinkhorn` (values and gradients) on fresh random logits."""

import pytest
import torch

from model.kernels.sinkhorn import fused_sinkhorn
from model.mhc import sinkhorn
from tests.kernels.helpers import DEVICE, pick, randn


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_fused_sinkhorn_equals_the_reference(iters):
    rows = pick((2, 37), (4, 8192))  # a partial last block on CPU; v4-small's 2 x 4096 tokens on a GPU
    for n in (2, 4):
        x = (randn(iters * 10 + n, *rows, n, n) * 3).requires_grad_(True)
        grad = randn(iters * 10 + n + 1, *rows, n, n)
        want = sinkhorn(x, iters, 1e-6)
        want.backward(grad)
        want_grad, x.grad = x.grad, None
        got = fused_sinkhorn(x, iters, 1e-6)
        got.backward(grad)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, want_grad, rtol=1e-4, atol=1e-5)
        assert got.device.type == DEVICE
