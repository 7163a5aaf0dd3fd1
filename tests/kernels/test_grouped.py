"""Grouped (per-expert) FP8 GEMMs vs their references; empty experts; the tile map."""

import pytest
import torch

from model.errors import MoeforgeError
from model.kernels import gemm_ref, grouping, quant, quant_ref
from model.kernels.grouped_gemm import fp8_grouped_gemm, fp8_kgrouped_gemm
from tests.kernels.helpers import DEVICE, assert_gemm_close, pick, randn, rel

# (rows, N, K, cumulative ends): empty experts first, in the middle and last; trailing padding rows
CASES = pick(
    [(320, 192, 256, [0, 100, 100, 230, 300, 300])],
    [(8192, 2048, 4096, [0, 1000, 1000, 3001, 5000, 8000, 8000, 8100]),
     (8192, 4096, 2048, [1024 * (i + 1) for i in range(8)])],
)


def offsets(ends):
    return torch.tensor(ends, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_grouped_gemm_matches_reference(case):
    m, n, k, ends = CASES[case]
    offs = offsets(ends)
    a, sa = quant_ref.quantize_rows_ref(randn(0, m, k))
    b, sb, _ = quant_ref.quantize_weight_ref(randn(1, len(ends), n, k, scale=0.02), transpose=False)
    cfg = pick({"BN": 64}, {})
    c = fp8_grouped_gemm(a, sa, b, sb, offs, out_dtype=torch.float32, config=cfg)
    ref = gemm_ref.fp8_grouped_gemm_ref(a, sa, b, sb, offs, out_dtype=torch.float32)
    assert_gemm_close(c, ref)
    assert (c[ends[-1]:] == 0).all()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kgrouped_weight_gradient_matches_reference(case):
    m, n, k, ends = CASES[case]
    offs = offsets(ends)
    dy, x = randn(2, m, n), randn(3, m, k)
    at, sat = quant.quantize_act_segments(dy, offs)
    bt, sbt = quant.quantize_act_segments(x, offs)
    c = fp8_kgrouped_gemm(at, sat, bt, sbt, offs, config=pick({"BM": 64, "BN": 64}, {}))
    ref = gemm_ref.fp8_kgrouped_gemm_ref(at, sat, bt, sbt, offs)
    assert_gemm_close(c, ref)
    starts = [0] + ends[:-1]
    exact = torch.stack([dy[s:e].t() @ x[s:e] for s, e in zip(starts, ends)])
    empty = [i for i, (s, e) in enumerate(zip(starts, ends)) if e <= s]
    assert all((c[i] == 0).all() for i in empty)
    assert rel(ref, exact) < 0.06


def test_tile_map_on_device():
    ends = [0, 100, 100, 230, 300, 300]
    offs = offsets(ends)
    te = grouping.tile_ends(offs)
    assert te.device == offs.device and te.tolist() == [0, 1, 1, 3, 4, 4]
    tiles = grouping.tile_rows_ref(offs)
    assert tiles == [(1, 0, 100), (3, 100, 228), (3, 228, 230), (4, 230, 300)]
    assert len(tiles) <= grouping.max_tiles(320, len(ends))


def test_bad_offsets_raise():
    a, sa = quant_ref.quantize_rows_ref(randn(0, 64, 128))
    b, sb, _ = quant_ref.quantize_weight_ref(randn(1, 2, 128, 128), transpose=False)
    with pytest.raises(MoeforgeError, match="int32"):
        fp8_grouped_gemm(a, sa, b, sb, offsets([32, 64]).long())
    with pytest.raises(MoeforgeError, match="offsets"):
        fp8_grouped_gemm(a, sa, b, sb, offsets([32, 48, 64]))
