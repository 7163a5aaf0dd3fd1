"""FP8 GEMM benchmark (issue 9): our block-scaled Triton GEMM vs BF16 torch.matmul vs torch._scaled_mm
(row-wise) on the linear-layer shapes of v4-small and v4-flash and on 8192^3, and our block-scaled grouped
GEMM vs the BF16 torch._grouped_mm at v4-flash expert shapes; all in one run, on one CUDA device.

    python bench/fp8.py [--tokens 8192] [--variants] [--out bench/results/fp8.json]

Operands are quantised once outside the timed region ("gemm" columns); "+quant" also times the 1x128
activation quantisation that a training step pays per product. TFLOP/s = 2 M N K / median time
(triton.testing.do_bench, L2 flushed between runs). ``--variants`` also times every kernel configuration
listed in VARIANTS (docs/benchmarks.md records what each changed). The table is printed last.
"""

import argparse
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import table, write_json  # noqa: E402
from model.kernels import fp8  # noqa: E402
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
]
GROUPED_VARIANTS = [
    ("g1 128x128 w8 s4", {}),
    ("g2 128x128 w8 s3", {"num_stages": 3}),
    ("g3 split2 w8 s4", {"SPLIT": 2}),
    ("g4 128x256 w8 s3", {"BN": 256, "num_stages": 3}),
    ("g5 split2 w8 s3", {"SPLIT": 2, "num_stages": 3}),
    ("g6 128x64 w4 s4", {"BN": 64, "num_warps": 4}),
    ("g7 warp-specialised w8 s4", {"WS": 1}),
]


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


def dense_row(label, m, n, k, config=None):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    a, sa = fp8.quantize_act(x)
    b, sb, _ = fp8.quantize_weight(w, transpose=False)
    (ra, rsa), (rb, rsb) = quantize_rowwise(x), quantize_rowwise(w)
    flop = 2.0 * m * n * k
    ref = x @ w.t()
    ours = fp8.fp8_gemm(a, sa, b, sb, config=config)
    row = {"shape": label, "M": m, "N": n, "K": k, "err_vs_bf16": rel_err(ours, ref)}
    row["bf16"] = tflops(flop, lambda: x @ w.t())
    row["rowwise"] = tflops(flop, lambda: torch._scaled_mm(ra, rb.t(), scale_a=rsa, scale_b=rsb.t(),
                                                          out_dtype=torch.bfloat16))
    row["ours"] = tflops(flop, lambda: fp8.fp8_gemm(a, sa, b, sb, config=config))
    row["ours+quant"] = tflops(flop, lambda: fp8.fp8_gemm(*fp8.quantize_act(x), b, sb, config=config))
    row["ours/bf16"] = row["ours"] / row["bf16"]
    return row


def expert_counts(rows: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Token counts per expert: multinomial over experts (uniform router), as cumulative int32 ends."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, experts, (rows,), generator=g)
    return torch.cumsum(torch.bincount(idx, minlength=experts), 0).to(torch.int32).cuda()


def grouped_row(label, rows, experts, n, k, config=None):
    offs = expert_counts(rows, experts)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(experts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wt = w.transpose(1, 2)  # [E, K, N] column-major view, what _grouped_mm wants
    a, sa = fp8.quantize_act(x)
    b, sb, _ = fp8.quantize_weight(w, transpose=False)
    flop = 2.0 * rows * n * k
    ref = torch._grouped_mm(x, wt, offs=offs)
    ours = fp8.fp8_grouped_gemm(a, sa, b, sb, offs, config=config)
    row = {"shape": label, "M": rows, "N": n, "K": k, "E": experts, "err_vs_bf16": rel_err(ours, ref)}
    row["bf16"] = tflops(flop, lambda: torch._grouped_mm(x, wt, offs=offs))
    if hasattr(torch, "_scaled_grouped_mm"):
        (ra, rsa), (rb, rsb) = quantize_rowwise(x), quantize_rowwise(w.reshape(-1, k))
        rbt = rb.view(experts, n, k).transpose(1, 2)
        row["rowwise"] = tflops(flop, lambda: torch._scaled_grouped_mm(
            ra, rbt, rsa.view(-1), rsb.view(experts, n), offs=offs, out_dtype=torch.bfloat16))
    row["ours"] = tflops(flop, lambda: fp8.fp8_grouped_gemm(a, sa, b, sb, offs, config=config))
    row["ours+quant"] = tflops(flop, lambda: fp8.fp8_grouped_gemm(*fp8.quantize_act(x), b, sb, offs,
                                                                  config=config))
    row["ours/bf16"] = row["ours"] / row["bf16"]
    return row


def safe(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except Exception as e:  # a variant that does not compile is a result too
        return {"shape": args[0], "error": f"{type(e).__name__}: {str(e)[:200]}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="M of the dense layer shapes")
    p.add_argument("--ep", type=int, default=8, help="expert-parallel degree: local experts = E / ep")
    p.add_argument("--variants", action="store_true", help="also time every kernel configuration")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fp8.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/fp8.py needs a CUDA device")
    torch.manual_seed(0)
    dense = [safe(dense_row, "8192^3", 8192, 8192, 8192)]
    for model in ("v4-small", "v4-flash"):
        dense += [safe(dense_row, *s) for s in model_shapes(model, args.tokens)]
    flash = yaml.safe_load((ROOT / "configs" / "model" / "v4-flash.yaml").read_text())
    experts = flash["n_routed_experts"] // args.ep
    rows = args.tokens * flash["num_experts_per_tok"]
    d, inter = flash["hidden_size"], flash["moe_intermediate_size"]
    grouped = [safe(grouped_row, "v4-flash experts w1/w3", rows, experts, inter, d),
               safe(grouped_row, "v4-flash experts w2", rows, experts, d, inter)]
    variants = []
    if args.variants:
        variants += [dict(safe(dense_row, "8192^3", 8192, 8192, 8192, cfg), variant=name, config=cfg)
                     for name, cfg in VARIANTS]
        variants += [dict(safe(grouped_row, "v4-flash experts w1/w3", rows, experts, inter, d, cfg),
                          variant=name, config=cfg) for name, cfg in GROUPED_VARIANTS]
    write_json(args.out, {"command": " ".join(sys.argv), "dense": dense, "grouped": grouped,
                          "variants": variants})
    cols = ["shape", "M", "N", "K", "bf16", "rowwise", "ours", "ours+quant", "ours/bf16", "err_vs_bf16",
            "error"]
    if variants:
        print(table(variants, ["variant"] + cols))
        print()
    print(table(dense + grouped, cols))


if __name__ == "__main__":
    main()
