"""Isolated-kernel comparison for issue 5: the rfactor CPU schedule (`compiler/cpu_schedules.py`), the batch-tiled
int4 kernel for the NK layout of q4f32_1 (`compiler/cpu_gemv.py`) and the kernel for the 64-row-blocked layout of
q4f32_cpu (`compiler/cpu_q4_blocked.py`), on the same weights; from PANEL_MIN rows the blocked kernel runs its panel
GEMM, and "blocked, no panel" is the same kernel with the row tiles of fewer rows at any row count. On a CPU with
AMX-BF16, "blocked AMX" is the kernel the compiler emits there (from PANEL_MIN rows on tiles) and "blocked" the
float32 one; AMX results are checked with a bound relative to the output's size (bf16 x3 products).

    .venv/bin/python bench/gemv_batched.py [--tiles 4 8] [--batches 1 2 4 8] [--prefill 128 512]

The rfactor kernel decodes the int4 weights again for every row of x, so its time grows linearly with the rows; the
tiled kernel decodes 16 weights of one output row into a register vector once per K chunk and does the FMAs of a tile
of rows with it. Decode rows are sequences ([B, 1, K]), prefill rows are tokens ([1, S, K]). Both kernels are checked
against numpy (float64) before timing; times are medians of `time_evaluator` (hot cache).
Shapes: SmolLM2-135M's qkv, gate_up, down (+ residual) and lm_head, q4f32_1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# all cores, as the engine runs (mlc_llm/serve/runner.py): TVM's own default was 1 thread on the 2-core VM
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

SHAPES = [(960, 576, False), (3072, 576, False), (576, 1536, True), (49152, 576, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, nargs="+", default=None, help="row tile sizes (default: the compiler's)")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()

    import tvm

    from mlc_llm.compiler import cpu_gemv, cpu_q4_blocked
    from mlc_llm.compiler.cpu.amx import has_amx
    from mlc_llm.compiler.cpu_schedules import schedule_nt_matmul
    from mlc_llm.compiler.target import make_target
    from mlc_llm.quantization.scheme import block_rows, dequantize_q4, quantize_q4

    tiles = tuple(a.tiles or cpu_gemv.TILES)
    target, dev = make_target("cpu"), tvm.cpu()
    amx = has_amx(target)
    extra = (" blocked AMX us | blocked / AMX |", "---|---|") if amx else ("", "")
    print(f"tiles {tiles}\n| N x K | rows | rfactor us | NK tiled us | blocked, no panel us | blocked us | "
          f"rfactor / tiled | tiled / blocked | no panel / blocked |{extra[0]}\n|---|---|---|---|---|---|---|---|---|"
          f"{extra[1]}")
    cases = [("b1", b) for b in a.batches] + [("1s", s) for s in a.prefill]
    for n, k, residual in SHAPES:
        rng = np.random.default_rng(0)
        q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), "float32")
        wd = dequantize_q4(q, s, k).astype(np.float64)
        libs = {}
        for layout in sorted({c[0] for c in cases}):
            stock = cpu_gemv.stock_kernel(n, k, layout, residual)
            funcs = [schedule_nt_matmul(stock), cpu_gemv.tiled_kernel(n, k, layout, residual, tiles),
                     cpu_q4_blocked.blocked_kernel(n, k, layout, residual, panel_min=0),
                     cpu_q4_blocked.blocked_kernel(n, k, layout, residual)]
            if amx:
                funcs.append(cpu_q4_blocked.blocked_kernel(n, k, layout, residual, amx=True))
            libs[layout] = [tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target).jit()
                            for f in funcs]
        for layout, rows in cases:
            shape = (rows, 1) if layout == "b1" else (1, rows)
            x = rng.standard_normal((*shape, k)).astype(np.float32)
            res = rng.standard_normal((*shape, n)).astype(np.float32)
            expected = x.astype(np.float64) @ wd.T + (res if residual else 0)
            times = []
            for i, lib in enumerate(libs[layout]):
                w = (block_rows(q), block_rows(s)) if i >= 2 else (q, s)
                args = [tvm.runtime.tensor(v, dev) for v in ((*w, x, res) if residual else (*w, x))]
                out = tvm.runtime.tensor(np.zeros((*shape, n), np.float32), dev)
                lib["main"](*args, out)
                assert np.abs(out.numpy() - expected).max() < (1e-3 if i < 4 else 3e-5 * np.abs(expected).max())
                number = max(1, 2000 // (rows * max(1, n // 1000)))
                runs = lib.time_evaluator("main", dev, number=number, repeat=a.repeat)(*args, out).results
                times.append(statistics.median(runs) * 1e6)
            kind = "B" if layout == "b1" else "S"
            line = f"| {n} x {k} | {kind}={rows} | " + " | ".join(f"{t:.0f}" for t in times[:4]) + " | "
            line += f"{times[0] / times[1]:.2f} | {times[1] / times[3]:.2f} | {times[2] / times[3]:.2f} |"
            if amx:
                line += f" {times[4]:.0f} | {times[3] / times[4]:.2f} |"
            print(line, flush=True)


if __name__ == "__main__":
    main()
