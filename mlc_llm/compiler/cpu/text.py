"""Kernels written as TVMScript text, and the conventions that text follows.

The attention kernels and the stock q4 kernels (`cpu_gemv.stock_source`: the form TVM's legalization produces, for
the equivalence check) are text; their loop nests are assembled in Python per call. A `@T.prim_func` closure takes the
same Python-chosen constants (`cpu_q4_blocked.py`, `cpu_q4_int8.py`, `cpu_gemv.tiled_kernel`, `cpu_activation.py`),
which is where new kernels go. Both styles share the builders of `vecmath.py` and `amx.py`.
"""
from __future__ import annotations

import tvm

from . import amx, vecmath


def parse(src: str) -> tvm.tirx.PrimFunc:
    """TVMScript text -> PrimFunc. Conventions of every kernel text, for what TVM 0.27 lowers them to
    (tests/test_cpu_codegen.py checks them):
    - a scalar or vector bound once is written `x = T.bind(expr)` (a Let). A plain `x = expr` declares a mutable
      local, which becomes a TVMBackendAllocWorkspace / FreeWorkspace pair where it is declared: per parallel task,
      per 64-row block, per KV page;
    - per-task scratch buffers are `scope="global"` allocations inside the parallel loop: under 1 KB LLVM gets a stack
      slot in the task's function (private to the thread, often promoted to registers); `scope="local"` ones go
      through the workspace pool at any size. Larger buffers take the pool either way;
    - the builders of `vecmath.BUILDERS` and `amx.BUILDERS` are called by name: `exp2(s[g, r] - m[g])`."""
    return tvm.script.from_source(src, extra_vars={"T": tvm.script.tirx, **vecmath.BUILDERS, **amx.BUILDERS})


def indent(text: str, level: int) -> str:
    """`text` (TVMScript lines) indented by `level` levels."""
    return "".join(" " * (4 * level) + line + "\n" for line in text.strip("\n").split("\n"))


def prefetch(element: str) -> str:
    """TIR text: the statement `vecmath.cache_prefetch(element)` (`element`: a buffer element, e.g. `qw[i, j]`)."""
    return f"T.evaluate(cache_prefetch({element}))"
