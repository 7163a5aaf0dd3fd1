"""Shared shapes, inputs and error bounds for the kernel tests."""

import torch

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
U_E4M3 = 2.0 ** -4  # unit roundoff of E4M3 (3 mantissa bits): |rel. error| <= 2^-4 for normal values
SUB_E4M3 = 2.0 ** -10  # half the subnormal step 2^-9: absolute error bound in units of the scale


def pick(cpu, gpu):
    """Small shapes for the interpreter, full layer shapes on a GPU."""
    return gpu if GPU else cpu


def randn(seed: int, *shape, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE)
    g.manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEVICE) * scale


def _bits(q: torch.Tensor) -> torch.Tensor:
    """fp8 bit patterns with -0.0 mapped to +0.0 (Triton on the H200 may write +0.0 where torch's cast
    gives -0.0; every other value must match bit for bit)."""
    u = q.view(torch.uint8)
    return torch.where(u == 0x80, torch.zeros_like(u), u)


def assert_same_fp8(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float8_e4m3fn
    diff = (_bits(a) != _bits(b)).sum().item()
    assert diff == 0, f"{diff} of {a.numel()} fp8 values differ"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gemm_bound(a, b, sa_full, sb_full):
    """Elementwise bound on |fp8 GEMM - a @ b^T| from quantising both operands: |da| <= u|a| + 2^-10 s_a
    (nearest rounding with 3 mantissa bits, plus the subnormal range), the same for b, plus fp32 sums."""
    ea = U_E4M3 * a.abs() + SUB_E4M3 * sa_full
    eb = U_E4M3 * b.abs() + SUB_E4M3 * sb_full
    return ea @ b.abs().t() + a.abs() @ eb.t() + ea @ eb.t() + 1e-6 * a.shape[1] * (a.abs() @ b.abs().t())


def assert_gemm_close(c: torch.Tensor, ref: torch.Tensor) -> None:
    """Kernel vs reference: the same fp8 products, summed in a different order (fp32 on the interpreter;
    on a GPU the tensor core adds the 128 products of a step with a shorter accumulator)."""
    tol = (2e-3 if GPU else 1e-5) * ref.abs().max().item() + 1e-30
    err = (c.float() - ref.float()).abs().max().item()
    assert err <= tol, f"max |kernel - reference| = {err:.3g} > {tol:.3g}"
