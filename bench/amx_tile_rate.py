"""Raw AMX-BF16 tile rate on this CPU, one thread: how long one `tdpbf16ps` (16x16x32 bf16 -> f32) takes in the
pattern of our first f32 prefill GEMM (`compiler/cpu_q4_blocked.py` before 2026-12-02's integer-weight kernel: 4
accumulator tiles, x hi/lo, w hi/lo, 3 products per accumulator per step), with the 10 tile loads per step (from L1:
the same small buffers) and without them.

    .venv/bin/python bench/amx_tile_rate.py [--iters 20000] [--fma 32]

`--fma N` also times 12 x N AVX-512 FMAs per iteration alone and inside the same loop as the tile products: whether
the vector units run while the tile unit works (a kernel could split its work between them).
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


def _source(with_loads: bool, iters: int, fma_rounds: int = 0, tiles: bool = True) -> str:
    """The loop of 12 products (+ 10 tile loads); `fma_rounds` > 0 adds 12 x that many float32 vector FMAs (12
    independent accumulators) to each iteration; `tiles=False` leaves only the FMAs."""
    def _amx(name: str, *args: str) -> str:  # the statement amx_op(name, *args) (`cpu.amx`)
        return f'T.evaluate(amx_op({", ".join((repr(name),) + args)}))'

    x_loads = [_amx("tileloadd64", "T.int8(4)", "T.address_of(a[0])", "T.int64(64)"),
               _amx("tileloadd64", "T.int8(5)", "T.address_of(a[512])", "T.int64(64)")]
    step = []
    for ct in range(4):
        if with_loads:
            step += [_amx("tileloadd64", "T.int8(6)", f"T.address_of(b[{ct * 1024}])", "T.int64(64)"),
                     _amx("tileloadd64", "T.int8(7)", f"T.address_of(b[{ct * 1024 + 512}])", "T.int64(64)")]
        step += [_amx("tdpbf16ps", f"T.int8({ct})", a, b)  # x_hi.w_hi + x_lo.w_hi + x_hi.w_lo
                 for a, b in (("T.int8(4)", "T.int8(6)"), ("T.int8(5)", "T.int8(6)"), ("T.int8(4)", "T.int8(7)"))]
    before = [_amx("tilezero", f"T.int8({t})") for t in range(4)]
    if with_loads:
        step = x_loads + step
    else:
        before += x_loads + [_amx("tileloadd64", "T.int8(6)", "T.address_of(b[0])", "T.int64(64)"),
                             _amx("tileloadd64", "T.int8(7)", "T.address_of(b[512])", "T.int64(64)")]
    if not tiles:
        step = []
    if fma_rounds:
        before += ['acc = T.alloc_buffer((12, 16), "float32", scope="global")',
                   "for i in range(12):", "    for l in T.vectorized(16):", "        acc[i, l] = T.float32(0)"]
        step += [f"for j in range({fma_rounds}):", "    for i in T.unroll(12):", "        for l in T.vectorized(16):",
                 "            acc[i, l] = acc[i, l] + xv[j % 8, l] * wv[i, l]"]
    after = [_amx("tilestored64", f"T.int8({t})", f"T.address_of(c[0, {16 * t}])", "T.int64(256)") for t in range(4)]
    if fma_rounds:
        after += ["for i in range(12):", "    for l in T.vectorized(16):", "        c[i, l] = c[i, l] + acc[i, l]"]
    lines = "\n".join("    " + s for s in before) + f"\n    for it in range({iters}):\n"
    lines += "\n".join("        " + s for s in step) + "\n" + "\n".join("    " + s for s in after)
    return f'''
@T.prim_func(s_tir=True)
def main(a: T.Buffer((1024,), "uint16"), b: T.Buffer((4096,), "uint16"), c: T.Buffer((16, 64), "float32"),
         xv: T.Buffer((8, 16), "float32"), wv: T.Buffer((12, 16), "float32")):
    tile_config()
{lines}
    {_amx("tilerelease")}
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--fma", type=int, default=0, metavar="N",
                    help="also time 12 x N float32 vector FMAs per iteration, alone and in the tile loop (overlap)")
    a = ap.parse_args()
    import tvm

    from mlc_llm.compiler.cpu.text import parse as _parse
    from mlc_llm.compiler.cpu.amx import amx_op, has_amx, tile_config
    from mlc_llm.compiler.target import make_target

    target, dev = make_target("cpu"), tvm.cpu()
    if not has_amx(target):
        print(f"no AMX-BF16 for this target ({target}): nothing to measure")
        return 1
    if ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) != 0:  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
        print("Linux refused the AMX state")
        return 1
    args = [tvm.runtime.tensor(np.zeros(n, np.uint16), dev) for n in (1024, 4096)]
    args += [tvm.runtime.tensor(np.zeros(shape, np.float32), dev) for shape in ((16, 64), (8, 16), (12, 16))]

    def step_ns(*variant) -> float:
        func = _parse(_source(*variant), {"amx_op": amx_op, "tile_config": tile_config})
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).jit()
        return min(lib.time_evaluator("main", dev, number=3, repeat=5)(*args).results) / a.iters * 1e9

    for with_loads in (True, False):
        per = step_ns(with_loads, a.iters) / 12
        print(f"{'with' if with_loads else 'without'} the 10 tile loads per 12 products: {per:.2f} ns per "
              f"tdpbf16ps = {16 * 16 * 32 * 2 / per:.0f} GFLOP/s of tile products, one thread")
    if a.fma:
        tile, fma, both = (step_ns(True, a.iters), step_ns(True, a.iters, a.fma, False),
                           step_ns(True, a.iters, a.fma))
        print(f"one iteration: 12 products + 10 loads {tile:.0f} ns, {12 * a.fma} vector FMAs {fma:.0f} ns, both in "
              f"the same loop {both:.0f} ns (sum {tile + fma:.0f}, max {max(tile, fma):.0f}): "
              f"{(tile + fma - both) / min(tile, fma):.0%} of the shorter part hidden")
    return 0


if __name__ == "__main__":
    sys.exit(main())
