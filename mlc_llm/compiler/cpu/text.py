"""TVMScript text -> PrimFunc, and the conventions of how TVM 0.27 lowers our kernels.

Every kernel of the project is a `@T.prim_func` closure (Python-chosen constants: shapes, tiles, epilogues, target
features) with `@T.macro` parts; text remains for the stock q4 kernels (`cpu_gemv.stock_source`: the form TVM's
legalization produces, which a kernel must equal to be replaced), for tests and for probes in bench/. The conventions
in `parse` hold for both styles.
"""
from __future__ import annotations

import tvm


def parse(src: str, names: dict | None = None) -> tvm.tirx.PrimFunc:
    """TVMScript text -> PrimFunc. Conventions of every kernel, for what TVM 0.27 lowers them to
    (tests/test_cpu_codegen.py checks them):
    - a scalar or vector bound once is written `x = T.bind(expr)` (a Let). A plain `x = expr` declares a mutable
      local, which becomes a TVMBackendAllocWorkspace / FreeWorkspace pair where it is declared: per parallel task,
      per 64-row block, per KV page;
    - per-task scratch buffers are `scope="global"` allocations inside the parallel loop: under 1 KB LLVM gets a stack
      slot in the task's function (private to the thread, often promoted to registers); `scope="local"` ones go
      through the workspace pool at any size. Larger buffers take the pool either way.
    `names`: Python values the text calls by name (TIR builders of `cpu.vecmath` / `cpu.amx`)."""
    return tvm.script.from_source(src, extra_vars={"T": tvm.script.tirx, **(names or {})})
