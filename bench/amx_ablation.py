"""Where the AMX prefill GEMM's time goes: the generated kernel text with parts removed, timed side by side.

    .venv/bin/python bench/amx_ablation.py [--shape 3072 576] [--rows 512] [--precision f32] [--rounds 9]

Variants of `cpu_q4_blocked.blocked_source(..., amx=True, precision=P)` (only timing: most give wrong results):
- "const fill": the weight panels are filled with a constant instead of dequantized int4 (the dequantize's cost);
- "1 product": f32 only: the x_lo.q products and x_lo's tile loads removed (the cost of the split of x);
- "no group step": f32 only: the per-group tile stores and scaled adds removed (their cost);
- "operands in L1": every step loads the same x and weight tiles (the cost of streaming them from L2);
- "no tile ops": no tile instructions (the dequantize, x conversion, per-group scaled adds, output stores).
Rounds interleave the variants; medians of 5 calls per round. Needs a CPU with AMX-BF16 (2 threads by default).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def _lines(src: str, keep, replace=None) -> str:
    out = []
    for line in src.split("\n"):
        if replace is not None and replace(line) is not None:
            line = line[:len(line) - len(line.lstrip())] + replace(line)
        if keep(line):
            out.append(line)
    return "\n".join(out)


def variants(src: str, precision: str) -> dict[str, str]:
    def fill(line):
        s = line.strip()
        if s.startswith("wh[g, ct, k2, l] ="):
            return "wh[g, ct, k2, l] = T.uint32(1065369472)"  # the bf16 pair (1.0, 1.0)
        return None

    def no_tiles(line):
        tile_ops = ("tdpbf16ps", "tileloadd", "tilestored", "tilezero")
        return "T.evaluate(0)" if any(op in line for op in tile_ops) else None

    out = {"kernel": src, "const fill": _lines(src, lambda _: True, fill)}
    if precision == "f32":
        out["1 product"] = _lines(src, lambda s: not ("T.int8(5), T.int8(6)" in s
                                                       or ("tileloadd" in s and "T.int8(5)" in s)))
        out["no group step"] = _lines(src, lambda s: not ("tilestored" in s and "cg[" in s)).replace(
            "cb[mi, l] = cb[mi, l] + qs[blk, g, l] * cg[mi, l]", "cb[mi, l] = cb[mi, l]")
    out["operands in L1"] = src.replace("T.address_of(wh[g, ", "T.address_of(wh[0, ")
    out["operands in L1"] = out["operands in L1"].replace("T.address_of(xa[mt, g, ", "T.address_of(xa[0, 0, ")
    out["no tile ops"] = _lines(src, lambda _: True, no_tiles)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=2, default=[3072, 576], metavar=("N", "K"))
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()

    import numpy as np
    import tvm

    from mlc_llm.compiler import cpu_q4_blocked
    from mlc_llm.compiler.cpu.amx import has_amx
    from mlc_llm.compiler.cpu.text import parse as _parse
    from mlc_llm.compiler.target import make_target
    from mlc_llm.quantization.scheme import block_rows, quantize_q4

    target, dev = make_target("cpu"), tvm.cpu()
    if not has_amx(target):
        sys.exit("this CPU has no AMX-BF16 tiles")
    (n, k), rows = a.shape, a.rows
    src = cpu_q4_blocked.blocked_source(n, k, "1s", False, amx=True, precision=a.precision)
    libs = {name: tvm.compile(tvm.IRModule({"main": _parse(text).with_attr("global_symbol", "main")}), target)["main"]
            for name, text in variants(src, a.precision).items()}
    rng = np.random.default_rng(0)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), "float32")
    args = [tvm.runtime.tensor(v, dev) for v in (block_rows(q), block_rows(s),
                                                 rng.standard_normal((1, rows, k)).astype(np.float32))]
    out = tvm.runtime.tensor(np.zeros((1, rows, n), np.float32), dev)
    times = {name: [] for name in libs}
    for _ in range(a.rounds):
        for name, f in libs.items():
            f(*args, out)
            start = time.perf_counter()
            for _ in range(5):
                f(*args, out)
            times[name].append((time.perf_counter() - start) / 5 * 1e6)
    flops = 2 * n * k * rows
    print(f"{n} x {k}, {rows} rows, precision {a.precision}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    for name, v in times.items():
        m = statistics.median(v)
        print(f"  {name:16s} {m:9.0f} us [{min(v):.0f}-{max(v):.0f}]  {flops / m / 1e3:8.1f} GFLOP/s of the GEMM")


if __name__ == "__main__":
    main()
