"""The batch-1 decode GEMV (int8 activations, float16 scales: SmolLM2's `cpu-int8.so`) on SmolLM2's matrices, its
weights read from memory as in a decode step, beside `bench/bandwidth.py`'s read-sum kernel over arrays of the same
size read the same way: how close a GEMV of that size comes to a pure streaming read, and how fast it runs from cache.

    .venv/bin/python bench/gemv_cold.py [--threads 2] [--rounds 5] [--shapes 576x1536+r 640x1536+r ...]

"cold": copies of the weights (or arrays) cycled through ~300 MB, so that every call reads its operand from memory;
"hot": one copy called again and again (in L2 / L3). Both kernels get TVM's 4 KB pages. Times: the fastest of
`--rounds` loops of Python calls (a call's fork / join of TVM's pool included, as in the engine). First line: what a
call of a kernel that does almost nothing costs, with a parallel loop (a fork / join of the pool) and without.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(960, 576, False, "qkv"), (3072, 576, False, "gate_up"), (576, 1536, True, "down + residual"),
          (49152, 576, False, "lm_head")]
POOL_BYTES = 300e6


def _time(call, operands: list, iters: int, rounds: int) -> float:
    """Seconds per call, the fastest of `rounds` loops of `iters` calls cycling through `operands`."""
    best = float("inf")
    for _ in range(rounds + 1):  # the first loop warms up
        start = time.perf_counter()
        for i in range(iters):
            call(*operands[i % len(operands)])
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def _empty_kernels(target):
    """Two kernels adding 1 to 2 x 16 floats: over a parallel loop of 2 tasks, and serially."""
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def parallel(a: T.Buffer((2, 16), "float32")):
        for c in T.parallel(2):
            for j in T.vectorized(16):
                a[c, j] = a[c, j] + T.float32(1)

    @T.prim_func(s_tir=True)
    def serial(a: T.Buffer((2, 16), "float32")):
        for c in range(2):
            for j in T.vectorized(16):
                a[c, j] = a[c, j] + T.float32(1)

    return tvm.compile(tvm.IRModule({"parallel": parallel.with_attr("global_symbol", "parallel"),
                                     "serial": serial.with_attr("global_symbol", "serial")}), target=target)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", metavar="NxK[+r]",
                    help="other matrices (N outputs, K inputs; +r: with a residual add) instead of SmolLM2's")
    a = ap.parse_args()
    shapes = SHAPES
    if a.shapes:
        try:
            shapes = [(int(s.split("x")[0]), int(s.split("x")[1].removesuffix("+r")), s.endswith("+r"), "")
                      for s in a.shapes]
        except ValueError:
            ap.error(f"--shapes takes NxK or NxK+r, got {a.shapes}")
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import tvm

    from bandwidth import build as build_read_sum
    from mlc_llm.compiler import cpu_q4_int8
    from mlc_llm.compiler.target import make_target
    from mlc_llm.quantization.scheme import block_rows, quantize_q4

    target = make_target("cpu")
    if not cpu_q4_int8.supported(target):
        print(f"no AVX512-VNNI for this target ({target}): the int8 GEMV does not exist here")
        return 1
    rng = np.random.default_rng(0)
    empty, cell = _empty_kernels(target), (tvm.runtime.tensor(np.zeros((2, 16), np.float32)),)
    fork = {name: _time(empty[name], [cell], 20000, a.rounds) * 1e6 for name in ("parallel", "serial")}
    print(f"an empty kernel: {fork['parallel']:.2f} us per call with a parallel loop, {fork['serial']:.2f} us "
          f"without")
    print(f"{a.threads} threads; GB/s of weight bytes (or array bytes) per call")
    print(f"{'matrix':<28}{'MB':>7}{'GEMV hot':>11}{'GEMV cold':>11}{'read cold':>11}{'GEMV / read':>13}")
    for n, k, residual, name in shapes:
        func = cpu_q4_int8.gemv_kernel(n, k, "b1", residual, scale_dtype="float16")
        gemv = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]
        q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), "float16")
        qb, sb = block_rows(q), block_rows(s)
        nbytes = qb.nbytes + sb.nbytes
        copies = max(2, int(POOL_BYTES // nbytes))
        x = tvm.runtime.tensor(rng.standard_normal((1, 1, k)).astype(np.float32))
        tail = ((tvm.runtime.tensor(rng.standard_normal((1, 1, n)).astype(np.float32)),) if residual else ()) + (
            tvm.runtime.tensor(np.zeros((1, 1, n), np.float32)),)
        weights = [(tvm.runtime.tensor(qb), tvm.runtime.tensor(sb), x, *tail) for _ in range(copies)]
        iters = max(copies, int(2e8 // nbytes))
        hot = _time(gemv, weights[:1], iters, a.rounds)
        cold = _time(gemv, weights, iters, a.rounds)
        del weights
        nchunk = 16 if nbytes < 4e6 else 64  # like the GEMV's 64-row blocks: enough tasks for the threads
        per = int(nbytes // 4) // (nchunk * 64) * 64
        read_sum = build_read_sum(nchunk, per)["read_sum"]
        out = tvm.runtime.tensor(np.zeros((nchunk, 64), np.float32))
        arrays = [(tvm.runtime.tensor(np.ones((nchunk, per), np.float32)), out) for _ in range(copies)]
        read = _time(read_sum, arrays, iters, a.rounds)
        read_bytes = nchunk * per * 4
        del arrays
        rates = [nbytes / hot / 1e9, nbytes / cold / 1e9, read_bytes / read / 1e9]
        label = f"{name} {n}x{k}{'+r' if residual else ''}".strip()
        print(f"{label:<28}{nbytes / 1e6:>7.2f}{rates[0]:>11.1f}{rates[1]:>11.1f}{rates[2]:>11.1f}"
              f"{rates[1] / rates[2]:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
