"""Streaming-read memory bandwidth with TVM's thread pool: the ceiling a batch-1 decode is measured against.

    python bench/bandwidth.py --threads 2 --size-mb 84 1024

A parallel kernel sums a float32 array (64 lanes = 4 independent AVX-512 accumulators per thread, contiguous
chunks split over the pool's threads like a GEMV's rows), compiled for this CPU; the array is written once before,
so its pages exist. GB/s = bytes read / median time of `--repeat` runs (each averaging enough calls for ~0.2 s).
Sizes: the bytes a decode step reads (partly served from the last-level cache when they fit) and a size far above
the caches (memory). The array lies in huge pages as the runner's weights do (`mlc_llm/serve/weight_arena.py`;
`--pages 4k`: TVM's allocation, 4 KB pages). `bench/compare_llamacpp.py --bandwidth` takes as the ceiling those
bytes ÷ the fastest timing over as many bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

LANES = 64


def build(nchunk: int, chunk: int):
    import tvm
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def read_sum(a: T.Buffer((nchunk, chunk), "float32"), out: T.Buffer((nchunk, LANES), "float32")):
        T.func_attr({"global_symbol": "read_sum", "tirx.noalias": True})
        for c in T.parallel(nchunk):
            acc = T.alloc_buffer((LANES,), "float32", scope="local")
            for j in T.vectorized(LANES):
                acc[j] = T.float32(0)
            for i in range(chunk // LANES):
                for j in T.vectorized(LANES):
                    acc[j] = acc[j] + a[c, i * LANES + j]
            for j in T.vectorized(LANES):
                out[c, j] = acc[j]

    from mlc_llm.compiler.target import make_target
    return tvm.compile(tvm.IRModule({"read_sum": read_sum}), target=make_target("cpu")).jit()


def measure(size_mb: float, repeat: int = 5, chunk_kb: int = 256, huge_pages: bool = True) -> dict:
    """Read bandwidth in GB/s over an array of `size_mb` MB (median, min, max of `repeat` timings), in memory advised
    for huge pages (ordinary pages where the platform has none) or TVM's allocation."""
    import numpy as np
    import tvm

    from mlc_llm.serve import weight_arena

    chunk = chunk_kb * 1024 // 4
    nchunk = max(1, int(size_mb * 1e6) // (chunk * 4))
    lib = build(nchunk, chunk)
    dev = tvm.cpu()
    host = np.random.default_rng(0).random((nchunk, chunk), dtype=np.float32)
    if huge_pages:  # (MLC_HUGE_PAGES, the runner's switch, does not apply: `--pages` decides)
        arena = weight_arena.Arena(host.nbytes)
        view = arena.bytes.view(np.float32).reshape(host.shape)
        view[...] = host
        a = tvm.runtime.from_dlpack(view)
    else:
        a = tvm.runtime.tensor(host, dev)
    out = tvm.runtime.tensor(np.zeros((nchunk, LANES), np.float32), dev)
    lib["read_sum"](a, out)
    # the kernel really read everything: per-chunk lane sums add up to the array's sum
    total = float(out.numpy().astype(np.float64).sum())
    expect = float(host.astype(np.float64).sum())
    if abs(total - expect) > 1e-3 * abs(expect):
        raise RuntimeError(f"read_sum is wrong: {total} vs {expect}")
    nbytes = nchunk * chunk * 4
    once = lib.time_evaluator("read_sum", dev, number=1, repeat=1)(a, out).mean
    number = max(1, int(0.2 / max(once, 1e-6)))
    timer = lib.time_evaluator("read_sum", dev, number=number, repeat=repeat)
    gbs = [nbytes / t / 1e9 for t in timer(a, out).results]
    return {"size_mb": nbytes / 1e6, "median": statistics.median(gbs), "min": min(gbs), "max": max(gbs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--size-mb", type=float, nargs="+", default=[1024.0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--pages", choices=("huge", "4k"), default="huge")
    a = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    rows = [measure(s, a.repeat, huge_pages=a.pages == "huge") for s in a.size_mb]
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['size_mb']:8.1f} MB: {r['median']:6.2f} GB/s [{r['min']:.2f}-{r['max']:.2f}] "
                  f"({a.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
