"""Compile the Gluon kernels for sm_90a on a machine without a GPU and report what ptxas says of each:
registers, spill bytes, shared memory, wgmma counts and any warning (e.g. "wgmma serialized").

There is no Gluon interpreter, so this is the check a kernel change gets before GPU time is spent on it.
It needs the triton release the kernels target (``gemm_gluon.GLUON_TRITON``; install it beside the local one,
e.g. ``pip install --target /tmp/t36 triton==3.6.0``):

    PYTHONPATH=/tmp/t36 python bench/gluon_compile.py [dense dense-ws grouped grouped-ws ...]

``--ptx DIR`` also writes each kernel's PTX without debug lines, to compare two versions of a kernel.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FP8 = torch.float8_e4m3fn


class _Sm90Target:
    """Just enough of a driver for ``kernel.warmup`` to compile for sm_90a with no GPU present."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 128)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return None

    def is_active(self):
        return True

    def get_empty_cache_for_benchmark(self):
        return None


def _desc(t, shape, block, dtype):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from model.kernels.gemm_gluon import smem_layout

    return TensorDescriptor(t, shape, [shape[1], 1], block, smem_layout(*block, dtype))


def dense(cfg, m=8192, n=8192, k=8192, out_dtype=torch.bfloat16):
    from model.kernels import gemm_gluon as gg

    cfg = dict(gg.CONFIG, **cfg)
    ws = bool(cfg["WS"])
    bm = 128 if ws else cfg["BM"]
    rows = 64 if ws else bm
    a, b = torch.empty(m, k, dtype=FP8), torch.empty(n, k, dtype=FP8)
    c = torch.empty(m, n, dtype=out_dtype)
    args = (_desc(a, [m, k], [rows, 128], FP8), _desc(b, [n, k], [128, 128], FP8),
            _desc(c, [m, n], [rows, 128], out_dtype), torch.empty(m, k // 128),
            torch.empty(n // 128, k // 128), m, n, k, k // 128, 1, k // 128, 1)
    common = dict(GROUP_M=cfg["GROUP_M"], STAGES=cfg["STAGES"], CARRY=bool(cfg["CARRY"]), grid=(1,))
    if ws:
        return gg._fp8_gemm_gluon_ws_kernel.warmup(*args, CONSUMER_REGS=cfg["CONSUMER_REGS"],
                                                   PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=4, **common)
    return gg._fp8_gemm_gluon_kernel.warmup(*args, num_warps=bm // 16, **common)


def grouped(cfg, m=49152, e=32, n=2048, k=4096, out_dtype=torch.bfloat16):
    from model.kernels import grouped_gluon as gr
    from model.kernels.grouping import max_tiles

    cfg = dict(gr.CONFIG, **cfg)
    ws = bool(cfg["WS"])
    a, b = torch.empty(m, k, dtype=FP8), torch.empty(e * n, k, dtype=FP8)
    c = torch.empty(m, n, dtype=out_dtype)
    args = (_desc(a, [m, k], [64 if ws else 128, 128], FP8), _desc(b, [e * n, k], [128, 128], FP8), c,
            torch.empty(m, k // 128), torch.empty(e, n // 128, k // 128), torch.zeros(e, dtype=torch.int32),
            m, n, k, e, n, k // 128, 1, (n // 128) * (k // 128), k // 128, 1)
    common = dict(STAGES=cfg["STAGES"], CARRY=bool(cfg["CARRY"]), grid=(n // 128, max_tiles(m, e)),
                  **gr.launch_params(out_dtype, e, ws))
    if ws:
        return gr._grouped_ws_kernel.warmup(*args, CONSUMER_REGS=cfg["CONSUMER_REGS"],
                                            PRODUCER_REGS=cfg["PRODUCER_REGS"], num_warps=4, **common)
    return gr._grouped_kernel.warmup(*args, num_warps=8, **common)


KERNELS = {
    "dense": lambda: dense({}), "dense-ws": lambda: dense({"WS": 1}),
    "dense-nocarry": lambda: dense({"CARRY": 0}),
    "grouped": lambda: grouped({}), "grouped-fp32": lambda: grouped({}, out_dtype=torch.float32),
    "grouped-s5": lambda: grouped({"STAGES": 5}), "grouped-ws": lambda: grouped({"WS": 1}),
    "grouped-nocarry": lambda: grouped({"CARRY": 0}),
    "grouped-w2": lambda: grouped({}, n=4096, k=2048),
}


def ptxas_report(ptx: str) -> dict:
    """What ptxas -v says of this PTX for sm_90a."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": ",".join(re.findall(r"Used (\d+) registers", text)) or "?",
            "spill_bytes": sum(int(s) + int(ld) for s, ld in spills),
            "warnings": "; ".join(x.strip() for x in text.splitlines() if "warn" in x.lower()) or "-",
            "ptxas_rc": out.returncode}


def code_lines(ptx: str) -> str:
    """The PTX without debug sections and line markers (what differs when only source lines moved)."""
    skip = (".loc", ".file", "//", ".b8", ".b32", ".b64", ".section", "$L__")
    return "\n".join(x for x in ptx.splitlines() if not x.strip().startswith(skip) and "debug" not in x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernels", nargs="*", default=list(KERNELS), help=f"any of {', '.join(KERNELS)}")
    p.add_argument("--ptx", type=Path, help="write each kernel's PTX (debug lines dropped) here")
    args = p.parse_args()
    from model.kernels.gemm_gluon import GLUON_TRITON, gluon_triton_ok

    if not gluon_triton_ok():
        sys.exit(f"triton {triton.__version__} is installed; the Gluon kernels target "
                 f"{'.'.join(map(str, GLUON_TRITON))} (see the module docstring)")
    driver.set_active(_Sm90Target())
    head = ("kernel", "registers", "spill B", "shared B", "wgmma", "waits")
    print(f"{head[0]:<16} {head[1]:>9} {head[2]:>7} {head[3]:>9} {head[4]:>6} {head[5]:>6}  warnings")
    for name in args.kernels:
        compiled = KERNELS[name]()
        ptx = compiled.asm["ptx"]
        r = ptxas_report(ptx)
        print(f"{name:<16} {r['registers']:>9} {r['spill_bytes']:>7} {compiled.metadata.shared:>9} "
              f"{ptx.count('wgmma.mma_async'):>6} {ptx.count('wgmma.wait_group'):>6}  {r['warnings']}")
        if args.ptx:
            args.ptx.mkdir(parents=True, exist_ok=True)
            (args.ptx / f"{name}.ptx").write_text(code_lines(ptx))


if __name__ == "__main__":
    main()
