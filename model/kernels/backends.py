"""The FP8 operations as one table per backend: "triton" (the kernels) or "reference" (plain PyTorch).

The autograd functions take the table, so the same layer code runs the kernels on the GPU and the
reference on a CPU without the Triton interpreter.
"""

from types import SimpleNamespace

from model.errors import ConfigError

from . import gemm_ref, quant_ref

BACKENDS = ("triton", "reference")


def _reference_rows(x, *, pow2=False, transpose=False):
    return quant_ref.quantize_cols_ref(x, pow2) if transpose else quant_ref.quantize_rows_ref(x, pow2)


def _reference_segments(x, offs, *, pow2=False):
    return quant_ref.quantize_segments_ref(x, offs, pow2)


def get_ops(backend: str) -> SimpleNamespace:
    """Namespace with quantize_act, quantize_act_dual, quantize_act_segments, quantize_weight, gemm,
    grouped_gemm and kgrouped_gemm for ``backend``."""
    if backend == "triton":
        from . import gemm, grouped_gemm, quant

        return SimpleNamespace(
            quantize_act=quant.quantize_act, quantize_act_dual=quant.quantize_act_dual,
            quantize_act_segments=quant.quantize_act_segments, quantize_weight=quant.quantize_weight,
            gemm=gemm.fp8_gemm, grouped_gemm=grouped_gemm.fp8_grouped_gemm,
            kgrouped_gemm=grouped_gemm.fp8_kgrouped_gemm,
        )
    if backend == "reference":
        return SimpleNamespace(
            quantize_act=_reference_rows, quantize_act_dual=quant_ref.quantize_act_dual_ref,
            quantize_act_segments=_reference_segments,
            quantize_weight=quant_ref.quantize_weight_ref,
            gemm=lambda *a, config=None, **k: gemm_ref.fp8_gemm_ref(*a, **k),
            grouped_gemm=lambda *a, config=None, **k: gemm_ref.fp8_grouped_gemm_ref(*a, **k),
            kgrouped_gemm=lambda *a, config=None, **k: gemm_ref.fp8_kgrouped_gemm_ref(*a, **k),
        )
    raise ConfigError("precision.backend", f"unknown FP8 backend {backend!r}; choose one of {BACKENDS}")
