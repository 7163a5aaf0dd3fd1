"""The Gluon grouped GEMM's tile map and boundary handling, emulated in PyTorch on CPU (there is no Gluon
interpreter): ``grouped_gluon.segment_tile_ref`` (the kernel's formulas) against ``grouping.tile_rows_ref``,
the grid's cover of every output row, and a tile-by-tile emulation of what the kernel loads (128-row A
tiles across expert ends, TMA zero fill, B as one [E * N, K] matrix) and stores (row and column masks)."""

import pytest
import torch

from model.kernels import gemm_ref, grouping, quant_ref
from model.kernels.grouped_gluon import BM, segment_tile_ref

BN = 128

# (rows, cumulative ends): empty experts first, in the middle and last; tokens off the 128 tile; trailing
# padding rows; a single expert; every expert empty; fewer rows than one tile
CASES = [
    (700, [0, 100, 100, 230, 300, 300, 555, 600]),
    (640, [128, 256, 384, 512, 640]),
    (300, [300]),
    (260, [0, 0, 0]),
    (90, [0, 40, 40, 90]),
    (1000, [1, 2, 3, 259, 700, 990]),
]


def tile_map(m, ends):
    offs = torch.tensor(ends, dtype=torch.int32)
    grid_tiles = grouping.max_tiles(m, len(ends), BM)
    return offs, segment_tile_ref(torch.arange(grid_tiles), offs, m)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_tile_map_matches_grouping(case):
    m, ends = CASES[case]
    offs, (e, row0, row_end, live) = tile_map(m, ends)
    want = grouping.tile_rows_ref(offs, BM)
    got = [(int(a), int(b), int(c)) for a, b, c, x in zip(e, row0, row_end, live) if x]
    assert got == want
    assert live.tolist() == sorted(live.tolist(), reverse=True)  # the tiles first, then the padding programs


@pytest.mark.parametrize("case", range(len(CASES)))
def test_grid_writes_every_row_once(case):
    """Tiles write their segment's rows, the programs past the last tile the rows after offs[-1]: together
    every row of the output once (so it needs no memset), and no tile writes another expert's rows."""
    m, ends = CASES[case]
    offs, (e, row0, row_end, live) = tile_map(m, ends)
    writes = torch.zeros(m, dtype=torch.long)
    starts = [0] + ends[:-1]
    for ei, r0, r1, x in zip(e.tolist(), row0.tolist(), row_end.tolist(), live.tolist()):
        if r1 > r0:
            writes[r0:r1] += 1
            if x:
                assert starts[ei] <= r0 and r1 <= ends[ei]
            else:
                assert r0 >= ends[-1]
    assert (writes == 1).all()


def emulate(a, sa, b, sb, offs):
    """The kernel, tile by tile: 128 rows of A from row0 (zeros past M), A scales 0 from row_end on, B's
    128 rows from e * N + n0 of the [E * N, K] view (zeros past E * N), expert e's scale block; store rows
    < row_end and columns < N; the padding programs store zeros."""
    m, k = a.shape
    n_exp, n, _ = b.shape
    out = torch.full((m, n), float("nan"))
    a_deq = torch.cat([a.float(), a.new_zeros(BM, k).float()])
    sa_pad = torch.cat([sa, sa.new_zeros(BM, sa.shape[1])])
    b_all = torch.cat([b.reshape(n_exp * n, k).float(), torch.zeros(BN, k)])
    _, (e, row0, row_end, live) = tile_map(m, offs.tolist())
    for n0 in range(0, n, BN):
        for ei, r0, r1, x in zip(e.tolist(), row0.tolist(), row_end.tolist(), live.tolist()):
            rows = torch.arange(r0, r0 + BM)
            keep = rows < r1
            if not x:
                out[r0:r1, n0:n0 + BN] = 0.0
                continue
            scale_a = torch.where(keep[:, None], sa_pad[r0:r0 + BM], 0.0).repeat_interleave(128, 1)[:, :k]
            scale_b = sb[ei, n0 // 128].repeat_interleave(128)[:k]
            tile_a = a_deq[r0:r0 + BM] * scale_a
            tile_b = b_all[ei * n + n0:ei * n + n0 + BN] * scale_b
            acc = tile_a @ tile_b.t()
            cols = min(BN, n - n0)
            out[r0:r1, n0:n0 + cols] = acc[keep][:, :cols]
    return out


@pytest.mark.parametrize("case", [0, 3, 5])
def test_emulated_kernel_matches_reference(case):
    m, ends = CASES[case]
    n, k = 200, 384
    offs = torch.tensor(ends, dtype=torch.int32)
    g = torch.Generator().manual_seed(case)
    a, sa = quant_ref.quantize_rows_ref(torch.randn(m, k, generator=g))
    w = torch.randn(len(ends), n, k, generator=g) * 0.02
    b, sb, _ = quant_ref.quantize_weight_ref(w, transpose=False)
    got = emulate(a, sa, b, sb, offs)
    ref = gemm_ref.fp8_grouped_gemm_ref(a, sa, b, sb, offs, out_dtype=torch.float32)
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (got[ends[-1]:] == 0).all()


def test_gluon_kernels_run_only_under_the_triton_they_target():
    """The Gluon API moves between releases (3.9 renamed the TMA copies): any other triton keeps the Triton
    kernels, so ``gluon_supported`` / ``grouped_gluon_supported`` refuse there."""
    from model.kernels.gemm_gluon import gluon_triton_ok

    assert gluon_triton_ok("3.6.0") and gluon_triton_ok("3.6.1")
    assert not any(gluon_triton_ok(v) for v in ("3.5.1", "3.7.0", "3.9.0", "3.10.0"))
