"""Raw AMX-BF16 tile rate on this CPU, one thread: how long one `tdpbf16ps` (16x16x32 bf16 -> f32) takes in the
pattern of our prefill GEMM (`compiler/cpu_q4_blocked.py`: 4 accumulator tiles, x hi/lo, w hi/lo, 3 products per
accumulator per step), with the 10 tile loads per step (from L1: the same small buffers) and without them.

    .venv/bin/python bench/amx_tile_rate.py [--iters 20000]

Needs a CPU with AMX-BF16 (exits otherwise) and asks Linux for the AMX state (arch_prctl) first. Run it several
times: on the project's VM the rate was bimodal from run to run (6-8 ns or 15-28 ns per product).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TVM_NUM_THREADS"] = "1"


def _source(with_loads: bool, iters: int) -> str:
    from mlc_llm.compiler.cpu_gemv import _indent
    from mlc_llm.compiler.cpu_q4_blocked import _amx, split_products, tile_config

    x_loads = [_amx("tileloadd64", "T.int8(4)", "T.address_of(a[0])", "T.int64(64)"),
               _amx("tileloadd64", "T.int8(5)", "T.address_of(a[512])", "T.int64(64)")]
    step = []
    for ct in range(4):
        if with_loads:
            step += [_amx("tileloadd64", "T.int8(6)", f"T.address_of(b[{ct * 1024}])", "T.int64(64)"),
                     _amx("tileloadd64", "T.int8(7)", f"T.address_of(b[{ct * 1024 + 512}])", "T.int64(64)")]
        step += split_products(ct)
    before = [_amx("tilezero", f"T.int8({t})") for t in range(4)]
    if with_loads:
        step = x_loads + step
    else:
        before += x_loads + [_amx("tileloadd64", "T.int8(6)", "T.address_of(b[0])", "T.int64(64)"),
                             _amx("tileloadd64", "T.int8(7)", "T.address_of(b[512])", "T.int64(64)")]
    after = [_amx("tilestored64", f"T.int8({t})", f"T.address_of(c[0, {16 * t}])", "T.int64(256)") for t in range(4)]
    lines = "\n".join("    " + s for s in before) + f"\n    for it in range({iters}):\n"
    lines += "\n".join("        " + s for s in step) + "\n" + "\n".join("    " + s for s in after)
    return f'''
@T.prim_func(s_tir=True)
def main(a: T.Buffer((1024,), "uint16"), b: T.Buffer((4096,), "uint16"), c: T.Buffer((16, 64), "float32")):
{_indent(tile_config(), 1)}
{lines}
    {_amx("tilerelease")}
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20000)
    a = ap.parse_args()
    import tvm

    from mlc_llm.compiler.cpu_gemv import _parse
    from mlc_llm.compiler.cpu_q4_blocked import has_amx
    from mlc_llm.compiler.target import make_target

    target, dev = make_target("cpu"), tvm.cpu()
    if not has_amx(target):
        print(f"no AMX-BF16 for this target ({target}): nothing to measure")
        return 1
    if ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) != 0:  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
        print("Linux refused the AMX state")
        return 1
    for with_loads in (True, False):
        lib = tvm.compile(tvm.IRModule({"main": _parse(_source(with_loads, a.iters)).with_attr(
            "global_symbol", "main")}), target).jit()
        args = [tvm.runtime.tensor(np.zeros(n, np.uint16), dev) for n in (1024, 4096)]
        args.append(tvm.runtime.tensor(np.zeros((16, 64), np.float32), dev))
        runs = lib.time_evaluator("main", dev, number=3, repeat=5)(*args).results
        per = min(runs) / (a.iters * 12)
        print(f"{'with' if with_loads else 'without'} the 10 tile loads per 12 products: {per * 1e9:.2f} ns per "
              f"tdpbf16ps = {16 * 16 * 32 * 2 / per / 1e9:.0f} GFLOP/s of tile products, one thread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
