"""FP8 GEMM benchmark (issue 9): our block-scaled Triton GEMM vs BF16 torch.matmul vs torch._scaled_mm
(row-wise) on the linear-layer shapes of v4-small and v4-flash and on 8192^3, and our block-scaled grouped
GEMM vs the BF16 torch._grouped_mm at v4-flash expert shapes; all in one run, on one CUDA device.

    python bench/fp8.py [--tokens 8192] [--variants] [--select REGEX] [--out bench/results/fp8.json]

Operands are quantised once outside the timed region ("gemm" columns); "+quant" also times the 1x128
activation quantisation that a training step pays per product. TFLOP/s = 2 M N K / median time
(triton.testing.do_bench, L2 flushed between runs). "ours" is ``fp8_gemm`` as configured (gemm.CONFIG);
on an sm_90 GPU the dense and the grouped rows also time the two kernels separately: "triton" (the Triton
GEMM) and "gluon" (the Gluon kernel, gemm_gluon.py / grouped_gluon.py). ``--variants`` also times every
kernel configuration listed in VARIANTS and GROUPED_VARIANTS (docs/benchmarks.md records what each
changed), ``--select`` keeps those whose name matches. The table is printed last.
"""

import argparse
import re
import sys
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402
from model.kernels import fp8  # noqa: E402
from model.kernels.gemm_gluon import fp8_gemm_gluon, gluon_supported  # noqa: E402
from model.kernels.grouped_gluon import fp8_grouped_gemm_gluon, grouped_gluon_supported  # noqa: E402
from model.kernels.rowwise import quantize_rowwise  # noqa: E402

# Kernel configurations of the dense GEMM tried at 8192^3 (name, config overrides of gemm.CONFIG).
VARIANTS = [
    ("v1 128x128 w8 s4", {}),
    ("v2 128x128 w8 s3", {"num_stages": 3}),
    ("v3 128x128 w8 s5", {"num_stages": 5}),
    ("v4 split2 128x128 w8 s4", {"SPLIT": 2}),
    ("v5 128x256 w8 s3", {"BN": 256, "num_stages": 3}),
    ("v6 256x128 w16 s3", {"BM": 256, "num_warps": 16, "num_stages": 3}),
    ("v7 128x128 w4 s4", {"num_warps": 4}),
    ("v8 persistent 128x128 w8 s4", {"PERSISTENT": 1}),
    ("v9 persistent split2 w8 s4", {"PERSISTENT": 1, "SPLIT": 2}),
    ("v10 256x128 w8 s3", {"BM": 256, "num_stages": 3}),
    ("v11 split2 128x128 w8 s2", {"SPLIT": 2, "num_stages": 2}),
    ("v12 split2 128x128 w8 s3", {"SPLIT": 2, "num_stages": 3}),
    ("v13 64x128 w4 s4", {"BM": 64, "num_warps": 4}),
    ("v14 64x128 w4 s6", {"BM": 64, "num_warps": 4, "num_stages": 6}),
    ("v15 64x256 w4 s3", {"BM": 64, "BN": 256, "num_warps": 4, "num_stages": 3}),
    ("v16 warp-specialised 128x128 w8 s4", {"WS": 1}),
    ("v17 persistent warp-specialised w8 s4", {"PERSISTENT": 1, "WS": 1}),
    ("v18 128x128 w8 s4 GROUP_M=16", {"GROUP_M": 16}),
    ("v19 carried product 128x128 w8 s4", {"CARRY": 1}),
    # Gluon kernels (gemm_gluon.CONFIG overrides under "gluon"): carried product (wgmma wait(1)) or not,
    # one partition (8 warps load and multiply) or warp-specialised (2 consumer warpgroups + TMA warp)
    ("v20 gluon carry 128x128 w8 s4", {"gluon": {}}),
    ("v21 gluon no-carry 128x128 w8 s4", {"gluon": {"CARRY": 0}}),
    ("v22 gluon carry warp-specialised s4", {"gluon": {"WS": 1}}),
    ("v23 gluon no-carry warp-specialised s4", {"gluon": {"WS": 1, "CARRY": 0}}),
    ("v24 gluon carry warp-specialised s5", {"gluon": {"WS": 1, "STAGES": 5}}),
    ("v25 gluon carry 128x128 w8 s5", {"gluon": {"STAGES": 5}}),
    ("v26 gluon carry 64x128 w4 s3", {"gluon": {"BM": 64, "STAGES": 3}}),
]
GROUPED_VARIANTS = [
    ("g1 128x128 w8 s4", {}),
    ("g2 128x128 w8 s3", {"num_stages": 3}),
    ("g3 split2 w8 s4", {"SPLIT": 2}),
    ("g4 128x256 w8 s3", {"BN": 256, "num_stages": 3}),
    ("g5 split2 w8 s3", {"SPLIT": 2, "num_stages": 3}),
    ("g6 128x64 w4 s4", {"BN": 64, "num_warps": 4}),
    ("g7 warp-specialised w8 s4", {"WS": 1}),
    # the Gluon grouped kernel (grouped_gluon.CONFIG overrides under "gluon"), 128x128 tiles
    ("gg1 gluon carry w8 s4", {"gluon": {}}),
    ("gg2 gluon carry w8 s5", {"gluon": {"STAGES": 5}}),
    ("gg3 gluon carry warp-specialised s4", {"gluon": {"WS": 1}}),
    ("gg4 gluon no-carry w8 s4", {"gluon": {"CARRY": 0}}),
]
# Triton variants (dense and grouped) time the Triton kernel whatever gemm.CONFIG["GLUON"] says
TRITON = {"GLUON": 0}
GLUON = True  # --no-gluon: leave the Gluon kernel out


def model_shapes(name: str, tokens: int) -> list[tuple[str, int, int, int]]:
    """(layer, M, N, K) of the dense linear layers of a model config (y = x W^T, W [N, K])."""
    c = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    d, inter = c["hidden_size"], c["moe_intermediate_size"]
    return [
        (f"{name} wq_a", tokens, c["q_lora_rank"], d),
        (f"{name} wq_b", tokens, c["num_attention_heads"] * c["head_dim"], c["q_lora_rank"]),
        (f"{name} wkv", tokens, c["head_dim"], d),
        (f"{name} wo_b", tokens, d, c["o_groups"] * c["o_lora_rank"]),
        (f"{name} shared w1/w3", tokens, inter, d),
        (f"{name} shared w2", tokens, d, inter),
    ]


def tflops(flop: float, fn) -> float:
    from triton.testing import do_bench

    return flop / (do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3) / 1e12


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gemm_fn(config):
    """The dense GEMM a variant times: fp8_gemm with ``config``, or the Gluon kernel (config["gluon"])."""
    if config and "gluon" in config:
        return lambda a, sa, b, sb: fp8_gemm_gluon(a, sa, b, sb, config=config["gluon"])
    return lambda a, sa, b, sb: fp8.fp8_gemm(a, sa, b, sb, config=config)


def dense_row(label, m, n, k, config=None, kernels=False):
    """One dense shape: BF16, row-wise FP8, ours (and ours+quant); ``kernels`` adds the Triton and the
    Gluon kernel's own columns."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    a, sa = fp8.quantize_act(x)
    b, sb, _ = fp8.quantize_weight(w, transpose=False)
    (ra, rsa), (rb, rsb) = quantize_rowwise(x), quantize_rowwise(w)
    flop = 2.0 * m * n * k
    ref = x @ w.t()
    gemm = gemm_fn(config)
    ours = gemm(a, sa, b, sb)
    row = {"shape": label, "M": m, "N": n, "K": k, "err_vs_bf16": rel_err(ours, ref)}
    row["bf16"] = tflops(flop, lambda: x @ w.t())
    row["rowwise"] = tflops(flop, lambda: torch._scaled_mm(ra, rb.t(), scale_a=rsa, scale_b=rsb.t(),
                                                          out_dtype=torch.bfloat16))
    row["ours"] = tflops(flop, lambda: gemm(a, sa, b, sb))
    row["ours+quant"] = tflops(flop, lambda: gemm(*fp8.quantize_act(x), b, sb))
    row["ours/bf16"] = row["ours"] / row["bf16"]
    if kernels:
        triton_gemm = gemm_fn(TRITON)
        row["triton"] = tflops(flop, lambda: triton_gemm(a, sa, b, sb))
        row["triton/bf16"] = row["triton"] / row["bf16"]
        if GLUON and gluon_supported(a, b):
            out = fp8_gemm_gluon(a, sa, b, sb)
            row["gluon_err_vs_triton"] = rel_err(out, triton_gemm(a, sa, b, sb))
            row["gluon"] = tflops(flop, lambda: fp8_gemm_gluon(a, sa, b, sb))
            row["gluon/bf16"] = row["gluon"] / row["bf16"]
    return row


def expert_counts(rows: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Token counts per expert: multinomial over experts (uniform router), as cumulative int32 ends."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, experts, (rows,), generator=g)
    return torch.cumsum(torch.bincount(idx, minlength=experts), 0).to(torch.int32).cuda()


def grouped_fn(config):
    """The grouped GEMM a variant times: fp8_grouped_gemm with ``config``, or the Gluon kernel."""
    if config and "gluon" in config:
        return lambda a, sa, b, sb, offs: fp8_grouped_gemm_gluon(a, sa, b, sb, offs, config=config["gluon"])
    return lambda a, sa, b, sb, offs: fp8.fp8_grouped_gemm(a, sa, b, sb, offs, config=config)


def grouped_row(label, rows, experts, n, k, config=None, kernels=False):
    """One expert shape: BF16 torch._grouped_mm, row-wise FP8 (where torch has it), ours (and ours+quant);
    ``kernels`` adds the Triton and the Gluon grouped kernel's own columns."""
    offs = expert_counts(rows, experts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wt = w.transpose(1, 2)  # [E, K, N] column-major view, what _grouped_mm wants
    a, sa = fp8.quantize_act(x)
    b, sb, _ = fp8.quantize_weight(w, transpose=False)
    flop = 2.0 * rows * n * k
    ref = torch._grouped_mm(x, wt, offs=offs)
    gemm = grouped_fn(config)
    ours = gemm(a, sa, b, sb, offs)
    row = {"shape": label, "M": rows, "N": n, "K": k, "E": experts, "err_vs_bf16": rel_err(ours, ref)}
    row["bf16"] = tflops(flop, lambda: torch._grouped_mm(x, wt, offs=offs))
    if hasattr(torch, "_scaled_grouped_mm"):
        (ra, rsa), (rb, rsb) = quantize_rowwise(x), quantize_rowwise(w.reshape(-1, k))
        rbt = rb.view(experts, n, k).transpose(1, 2)
        row["rowwise"] = tflops(flop, lambda: torch._scaled_grouped_mm(
            ra, rbt, rsa.view(-1), rsb.view(experts, n), offs=offs, out_dtype=torch.bfloat16))
    row["ours"] = tflops(flop, lambda: gemm(a, sa, b, sb, offs))
    row["ours+quant"] = tflops(flop, lambda: gemm(*fp8.quantize_act(x), b, sb, offs))
    row["ours/bf16"] = row["ours"] / row["bf16"]
    if kernels:
        triton_gemm = grouped_fn(TRITON)
        row["triton"] = tflops(flop, lambda: triton_gemm(a, sa, b, sb, offs))
        row["triton/bf16"] = row["triton"] / row["bf16"]
        if GLUON and grouped_gluon_supported(a, b):
            out = fp8_grouped_gemm_gluon(a, sa, b, sb, offs)
            row["gluon_err_vs_triton"] = rel_err(out, triton_gemm(a, sa, b, sb, offs))
            row["gluon"] = tflops(flop, lambda: fp8_grouped_gemm_gluon(a, sa, b, sb, offs))
            row["gluon/bf16"] = row["gluon"] / row["bf16"]
    return row


def safe(fn, *args, **kw):
    try:
        row = fn(*args, **kw)
    except Exception as e:  # a variant that does not compile is a result too
        traceback.print_exc()
        row = {"shape": args[0], "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print({c: round(v, 4) if isinstance(v, float) else v for c, v in row.items()}, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="M of the dense layer shapes")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel degree: local experts = E / ep")
    p.add_argument("--variants", action="store_true", help="also time every kernel configuration")
    p.add_argument("--select", default="", help="with --variants: only the variants whose name matches")
    p.add_argument("--skip", default="", help="with --variants: leave out the variants whose name matches")
    p.add_argument("--rows", default="", help="only the table's shapes whose name matches")
    p.add_argument("--no-gluon", action="store_true", help="leave out the Gluon kernel (columns, variants)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fp8.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8.py needs a CUDA device")
    torch.manual_seed(0)
    global GLUON
    GLUON = not args.no_gluon
    rows_re = re.compile(args.rows)

    def save(dense, grouped, variants):  # after every section: a run cut short keeps what it measured
        write_json(args.out, {"command": " ".join(sys.argv), "dense": dense, "grouped": grouped,
                              "variants": variants})

    shapes = [("8192^3", 8192, 8192, 8192)]
    for model in ("v4-small", "v4-flash"):
        shapes += model_shapes(model, args.tokens)
    dense = [safe(dense_row, *s, kernels=True) for s in shapes if rows_re.search(s[0])]
    save(dense, [], [])
    flash = yaml.safe_load((ROOT / "configs" / "model" / "v4-flash.yaml").read_text())
    experts = flash["n_routed_experts"] // args.ep
    rows = args.tokens * flash["num_experts_per_tok"]
    d, inter = flash["hidden_size"], flash["moe_intermediate_size"]
    expert_shapes = [("v4-flash experts w1/w3", rows, experts, inter, d),
                     ("v4-flash experts w2", rows, experts, d, inter)]
    grouped = [safe(grouped_row, *g, kernels=True) for g in expert_shapes if rows_re.search(g[0])]
    save(dense, grouped, [])
    variants = []
    if args.variants:
        def chosen(name, cfg):
            return (re.search(args.select, name) and not (args.skip and re.search(args.skip, name))
                    and (GLUON or "gluon" not in cfg))

        for name, cfg in VARIANTS:
            if chosen(name, cfg):
                row = safe(dense_row, "8192^3", 8192, 8192, 8192,
                           cfg if "gluon" in cfg else dict(cfg, **TRITON))
                variants.append(dict(row, variant=name, config=cfg))
                save(dense, grouped, variants)
        for name, cfg in GROUPED_VARIANTS:
            if chosen(name, cfg):
                row = safe(grouped_row, "v4-flash experts w1/w3", rows, experts, inter, d,
                           cfg if "gluon" in cfg else dict(cfg, **TRITON))
                variants.append(dict(row, variant=name, config=cfg))
                save(dense, grouped, variants)
    save(dense, grouped, variants)
    cols = ["shape", "M", "N", "K", "bf16", "rowwise", "ours", "ours+quant", "ours/bf16", "err_vs_bf16",
            "error"]
    if variants:
        print(table(variants, ["variant"] + cols))
        print()
    print(table(dense + grouped, cols[:-2] + ["triton", "triton/bf16", "gluon", "gluon/bf16", "err_vs_bf16",
                                              "gluon_err_vs_triton", "error"]))


if __name__ == "__main__":
    main()
