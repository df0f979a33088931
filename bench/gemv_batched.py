"""Isolated-kernel experiment for batched decode (issue 5): the shipped CPU schedule vs a prototype GEMV that reuses
each dequantized weight vector across a tile of batch rows.

    .venv/bin/python bench/gemv_batched.py [--tile 4] [--batches 1 2 4 8]

The shipped kernel (`compiler/cpu_schedules.py`) decodes the int4 weights again for every batch row, so its time grows
linearly with the batch. The prototype (TVMScript generated here, not used by the compiler yet) decodes 16 weights of
one output row into a register vector once per K chunk and does the FMAs of `--tile` batch rows with it; rows of the
last tile are clamped on read (`min(b, B-1)`) and skipped on write, so any batch size works with a static register
tile. Both are checked against numpy (float64) before timing; times are medians of `time_evaluator` (hot cache).
Shapes: SmolLM2-135M's qkv, gate_up, down (+ residual) and lm_head, q4f32_1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS, LANES = 8, 16

_BODY = """
@T.prim_func(private=True, s_tir=True)
def gemv(qw: T.Buffer((T.int64({n}), T.int64({kw})), "uint32"), qs: T.Buffer((T.int64({n}), T.int64({g})), "float32"),
         x_h: T.handle, r_h: T.handle, y_h: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    B = T.int64()
    x = T.match_buffer(x_h, (B, T.int64(1), T.int64({k})), "float32")
    r = T.match_buffer(r_h, (B, T.int64(1), T.int64({n})), "float32")
    y = T.match_buffer(y_h, (B, T.int64(1), T.int64({n})), "float32")
    for nb in T.parallel(T.int64({nb})):
        acc = T.alloc_buffer(({t}, {rows}, {lanes}), "float32", scope="local")
        w = T.alloc_buffer(({lanes},), "float32", scope="local")
        tot = T.alloc_buffer((1,), "float32", scope="local")
        for bo in range((B + T.int64({t} - 1)) // T.int64({t})):
            for bi, ni in T.grid({t}, {rows}):
                for l in T.vectorized({lanes}):
                    acc[bi, ni, l] = T.float32(0)
            for ni in range({rows}):
                for k0 in range(T.int64({kc})):
                    for l in T.vectorized({lanes}):
                        w[l] = (T.Cast("float32", (qw[nb * {rows} + ni, (k0 * {lanes} + l) // 8]
                                >> T.Cast("uint32", (k0 * {lanes} + l) % 8 * 4)) & T.uint32(15)) - T.float32(7)) \\
                            * qs[nb * {rows} + ni, (k0 * {lanes} + l) // 32]
                    for bi in T.unroll({t}):
                        for l in T.vectorized({lanes}):
                            acc[bi, ni, l] = acc[bi, ni, l] + x[T.min(bo * {t} + bi, B - 1), 0, k0 * {lanes} + l] * w[l]
            for bi in range({t}):
                if bo * {t} + bi < B:
                    for ni in range({rows}):
                        tot[0] = T.float32(0)
                        for l in range({lanes}):
                            tot[0] = tot[0] + acc[bi, ni, l]
                        y[bo * {t} + bi, 0, nb * {rows} + ni] = tot[0] + r[bo * {t} + bi, 0, nb * {rows} + ni]
"""


def batched_gemv(n: int, k: int, tile: int):
    import tvm

    src = _BODY.format(n=n, k=k, kw=k // 8, g=k // 32, nb=n // ROWS, kc=k // LANES, t=tile, rows=ROWS, lanes=LANES)
    return tvm.script.from_source(src, extra_vars={"T": tvm.script.tirx})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tile", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()

    import tvm

    from mlc_llm.compiler.cpu_schedules import schedule_nt_matmul
    from mlc_llm.compiler.target import make_target
    from mlc_llm.quantization.scheme import dequantize_q4, quantize_q4
    from tests.test_cpu_schedules import _kernel

    target, dev = make_target("cpu"), tvm.cpu()
    print("| N x K | batch | shipped us | prototype us | shipped / prototype |\n|---|---|---|---|---|")
    for n, k in [(960, 576), (3072, 576), (576, 1536), (49152, 576)]:
        shipped = tvm.compile(tvm.IRModule({"main": schedule_nt_matmul(_kernel(n, k, True))
                                            .with_attr("tirx.noalias", True)}), target).jit()
        proto = tvm.compile(tvm.IRModule({"main": batched_gemv(n, k, a.tile).with_attr("global_symbol", "main")}),
                            target).jit()
        rng = np.random.default_rng(0)
        q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), "float32")
        wd = dequantize_q4(q, s, k).astype(np.float64)
        for b in a.batches:
            x = rng.standard_normal((b, 1, k)).astype(np.float32)
            res = rng.standard_normal((b, 1, n)).astype(np.float32)
            expected = x.astype(np.float64) @ wd.T + res
            args = [tvm.runtime.tensor(v, dev) for v in (q, s, x, res)]
            times = []
            for lib in (shipped, proto):
                out = tvm.runtime.tensor(np.zeros((b, 1, n), np.float32), dev)
                lib["main"](*args, out)
                assert np.abs(out.numpy() - expected).max() < 1e-3
                runs = lib.time_evaluator("main", dev, number=20, repeat=a.repeat)(*args, out).results
                times.append(statistics.median(runs) * 1e6)
            print(f"| {n} x {k} | {b} | {times[0]:.0f} | {times[1]:.0f} | {times[0] / times[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
