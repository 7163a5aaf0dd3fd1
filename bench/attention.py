"""V4 attention-core benchmark (issue 10): forward+backward time and peak memory at 4K-128K tokens on one
CUDA device, for the v4-small and v4-flash attention shapes (configs/model/*.yaml), one packed document:

  ours-csa   Triton indexer scoring + top-k, then the Triton attention kernels (window + top-k entries)
  ours-hca   Triton attention kernels (window + every causal entry at rate 128)
  ref-*      the PyTorch gather reference (model.sparse_attention.sparse_layer, automatic chunks)
  dense-*    the masked S x S reference (model.attention.attention_core; only where it fits)
  sdpa-512   full causal scaled_dot_product_attention, H heads of width 512
  sdpa-128   full causal SDPA forced to FlashAttention, 4H heads of width 128 (the same total query width)

    python bench/attention.py [--sizes 4096 16384 65536 131072] [--budget-s 150] [--out FILE.json]

bf16 inputs; ms = median of CUDA-event timings (1 warm-up); MB = peak allocated during the step minus what
was allocated before it. TFLOP/s counts the attention's useful FLOPs (4 H C per query-key pair forward, the
backward 2.5x that, FlashAttention's convention) plus the indexer's 2 n_I c_I per scored entry. Results are
written after every measurement, so a run cut short keeps what it measured. The table is printed last.
"""

import argparse
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402
from model.attention import attention_core  # noqa: E402
from model.indexer import Indexer, select_topk, selection_mask  # noqa: E402
from model.kernels.indexer_topk import index_topk  # noqa: E402
from model.kernels.sparse_attn import sparse_attention  # noqa: E402
from model.layout import SeqLayout  # noqa: E402
from model.sparse_attention import sparse_layer  # noqa: E402

H200_BF16_TFLOPS = 989.0  # dense BF16 tensor-core peak
H200_HBM_TBS = 4.8
OURS = ["ours-csa", "ours-hca", "sdpa-128"]
PRIORITY = [("v4-small", OURS), ("v4-flash", OURS),
            ("v4-small", ["sdpa-512", "ref-csa", "ref-hca", "dense-csa", "dense-hca"]),
            ("v4-flash", ["sdpa-512", "ref-csa", "ref-hca", "dense-csa", "dense-hca"])]
QUADRATIC = ("sdpa", "dense")


def shape(name: str) -> SimpleNamespace:
    cfg = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    rates = cfg["compress_rates"]
    return SimpleNamespace(name=name, h=cfg["num_attention_heads"], c=cfg["head_dim"],
                           window=cfg["sliding_window"], topk=cfg["index_topk"], ni=cfg["index_n_heads"],
                           ci=cfg["index_head_dim"], csa=rates["compressed_sparse_attention"],
                           hca=rates["heavily_compressed_attention"])


def work(sh, s: int, kind: str) -> float:
    """Useful FLOPs of one forward+backward (see the module docstring)."""
    pos = torch.arange(s, dtype=torch.float64)
    keys = torch.clamp(pos + 1, max=sh.window)
    flops = 0.0
    if kind == "csa":
        nvis = torch.floor((pos + 1) / sh.csa)
        keys = keys + torch.clamp(nvis, max=sh.topk)
        flops += 2 * sh.ni * sh.ci * nvis.sum().item()
    elif kind == "hca":
        keys = keys + torch.floor((pos + 1) / sh.hca)
    return flops + 3.5 * 4 * sh.h * sh.c * keys.sum().item()


def make_step(sh, s: int, impl: str, dev):
    """Inputs (built here, untimed) and a closure running one forward+backward."""
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16

    def rnd(*size, dtype=bf, grad=True):
        return torch.randn(*size, generator=g, device=dev, dtype=torch.float32).to(dtype).requires_grad_(grad)

    if impl.startswith("sdpa"):
        hd = 128 if impl == "sdpa-128" else sh.c
        n = sh.h * sh.c // hd
        q, k, v = (rnd(1, n, s, hd) for _ in range(3))
        do = rnd(1, n, s, hd, grad=False)

        def step():
            if impl == "sdpa-128":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(do)
        return step, [q, k, v]

    variant, kind = impl.split("-")
    rate = sh.csa if kind == "csa" else sh.hca
    lay = SeqLayout.build(1, s, torch.device(dev), None)
    ent = lay.entries(rate)
    q, kv, comp = rnd(1, s, sh.h, sh.c), rnd(1, s, sh.c), rnd(1, ent.count, sh.c)
    sink = rnd(sh.h, dtype=torch.float32)
    do = rnd(1, s, sh.h, sh.c, grad=False)
    index = None
    if kind == "csa":
        index = (rnd(1, s, sh.ni, sh.ci, dtype=torch.float32, grad=False),
                 rnd(1, s, sh.ni, dtype=torch.float32, grad=False) * sh.ni**-0.5,
                 rnd(1, ent.count, sh.ci, grad=False))
    scale = sh.c**-0.5
    leaves = [q, kv, comp, sink]

    if variant == "ours":
        def step():
            idx = None
            if index is not None:
                idx = index_topk(*index, ent.first_BS, ent.nvis_BS, sh.topk)
            first, nvis = (None, None) if idx is not None else (ent.first_BS, ent.nvis_BS)
            o = sparse_attention(q, kv, sink, lay.positions_BS, sh.window, scale, comp, idx, first, nvis)
            o.backward(do)
    elif variant == "ref":
        attn = SimpleNamespace(window=sh.window, index_topk=sh.topk, scale=scale, attn_sink=sink,
                               indexer=Indexer, select=lambda sc, vis: select_topk(sc, vis, sh.topk))

        def step():
            sparse_layer(attn, q, kv, comp, ent, index, lay.positions_BS, "off", 0)[0].backward(do)
    else:
        win = lay.window_mask(sh.window)

        def step():
            sel = ent.visible_BST
            if index is not None:
                with torch.no_grad():
                    sel = selection_mask(*select_topk(Indexer.score(*index), sel, sh.topk), ent.count)
            attention_core(q, kv, win, comp, sel, sink, scale).backward(do)
    return step, leaves


def measure(step, leaves, reps: int):
    """(median ms, peak extra MB) of `step` after one warm-up."""
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        for t in leaves:  # before the baseline: the previous step's gradients do not count against it
            t.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return sorted(times)[len(times) // 2], peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--models", nargs="+", default=None, help="only these models (default: all)")
    p.add_argument("--impls", nargs="+", default=None, help="only these implementations (ours-csa ...)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "attention.json")
    args = p.parse_args()
    deadline = time.monotonic() + args.budget_s
    dev = "cuda"
    rows, last = [], {}
    for name, impls in PRIORITY:
        if args.models and name not in args.models:
            continue
        sh = shape(name)
        for impl in impls:
            if args.impls and impl not in args.impls:
                continue
            for s in args.sizes:
                row = {"model": name, "impl": impl, "tokens": s}
                prev = last.get((name, impl))
                left = deadline - time.monotonic()
                if prev is not None and prev[0] is None:
                    row["skipped"] = "smaller size failed"
                elif prev is not None and (2 + args.reps) * prev[1] * (s / prev[0]) ** (
                        2 if impl.startswith(QUADRATIC) else 1) / 1e3 > left - 5:
                    row["skipped"] = "over the time budget"
                elif left < 10:
                    row["skipped"] = "over the time budget"
                else:
                    try:
                        step, leaves = make_step(sh, s, impl, dev)
                        ms, mb = measure(step, leaves, args.reps)
                        row.update(ms=ms, peak_mb=mb)
                        kind = impl.split("-")[1] if not impl.startswith("sdpa") else "full"
                        flops = work(sh, s, kind) if kind != "full" else 3.5 * 2 * sh.h * sh.c * s * s
                        row["tflops"] = flops / ms / 1e9
                        last[(name, impl)] = (s, ms)
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                        last[(name, impl)] = (None, None)
                    except Exception as e:  # an unsupported backend (e.g. SDPA at width 512) is a result too
                        row["skipped"] = f"{type(e).__name__}: {str(e)[:120]}"
                        last[(name, impl)] = (None, None)
                    finally:
                        step = leaves = None
                        torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
                write_json(args.out, {"rows": rows, "summary": summary(rows),
                                      "limits": {"bf16_tflops": H200_BF16_TFLOPS, "hbm_tbs": H200_HBM_TBS}})
    print(table(rows, ["model", "impl", "tokens", "ms", "peak_mb", "tflops", "skipped"]))
    for line in summary(rows):
        print(line)


def summary(rows) -> list[str]:
    """Speed-ups over FlashAttention-backed SDPA (4H x 128) and the memory growth of our kernels."""
    by = {(r["model"], r["impl"], r["tokens"]): r for r in rows if "ms" in r}
    out = []
    for (model, impl, s), r in sorted(by.items()):
        base = by.get((model, "sdpa-128", s))
        if impl.startswith("ours") and base is not None:
            out.append(f"{model} {impl} {s}: {base['ms'] / r['ms']:.1f}x faster than sdpa-128")
    for model in {k[0] for k in by}:
        for impl in ("ours-csa", "ours-hca"):
            mem = [(s, by[(model, impl, s)]["peak_mb"]) for s in sorted({k[2] for k in by})
                   if (model, impl, s) in by]
            if len(mem) > 1:
                (s0, m0), (s1, m1) = mem[0], mem[-1]
                growth = math.log(m1 / m0) / math.log(s1 / s0) if m0 > 0 and m1 > 0 else float("nan")
                out.append(f"{model} {impl} peak memory {s0}->{s1}: {m0:.0f}->{m1:.0f} MB "
                           f"(exponent {growth:.2f})")
    return out


if __name__ == "__main__":
    main()
