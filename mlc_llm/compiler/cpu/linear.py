"""What the int4 linear-layer kernels share: how they address rows of x, y and the epilogue's addend r, the blocked
weight layout of `q4f32_cpu`, and their signature.

Rows of x / y / r lie on axis 0 ("b1": [R, 1, *], a decode batch), on axis 1 ("1s": [1, R, *], a prefill) or there
is one ("11"); r is a residual of y's shape, or a bias [N] (`BIAS`). The blocked layout stores 64 output rows per
block: `qw uint32[N/64, K/8, 64]`, `qs[N/64, K/32, 64]` (a group of 32 K-values shares a scale)."""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .vecmath import cache_prefetch

LAYOUTS = ("b1", "1s", "11")
BIAS = "bias"  # the `residual` argument of the kernels: False, True (y = r + x.w^T) or BIAS (y = x.w^T + r[col])
BLOCK = 64  # output rows per block of the blocked layout (scheme.BLOCK_ROWS)
# Groups of 32 K-values prefetched ahead (1 KB of words + 256 B of scales each) by the blocked GEMVs: the hardware
# prefetcher stops at 4 KB pages. Only where it pays (`cpu_q4_blocked.prefetch_pays`).
PREFETCH_GROUPS = 4


def at(layout: str, row, col) -> tuple:
    """The index of x / y / r at flat row `row`, column `col`."""
    if layout == "b1":
        return (row, 0, col)
    if layout == "1s":
        return (0, row, col)
    return (0, 0, col)


def dims(layout: str, rows) -> tuple:
    """The leading two dimensions of x / y / r for `rows` rows."""
    if layout == "b1":
        return (rows, T.int64(1))
    return (T.int64(1), rows) if layout == "1s" else (T.int64(1), T.int64(1))


def addend(residual, r, layout: str, row, col):
    """The epilogue's addend for output [row, col] (`residual`: False, True or BIAS), or None."""
    if residual == BIAS:
        return r[col]
    return r[at(layout, row, col)] if residual else None


def plus(residual, r, layout: str, row, col, value):
    """`value` plus the epilogue's addend for output [row, col], addend first."""
    return value if not residual else addend(residual, r, layout, row, col) + value


@T.macro
def prefetch_groups(qw, qs, blk, g):
    """Prefetch the words and scales of group g + PREFETCH_GROUPS of block blk (past the block's end: the next
    block, which the same task or its neighbour reads next; past the buffer's end a prefetch is only a hint)."""
    for c in T.unroll(16):
        T.evaluate(cache_prefetch(qw[blk, g * 4 + 4 * PREFETCH_GROUPS + c // 4, (c % 4) * 16]))
    for c in T.unroll(4):
        T.evaluate(cache_prefetch(qs[blk, g + PREFETCH_GROUPS, c * 16]))


def kernel(body, layout: str, residual, qw_shape: tuple, qs_shape: tuple, scale_dtype: str, k: int, n: int,
           n_out: int = 0) -> tvm.tirx.PrimFunc:
    """`body(qw, qs, x, r, y, rows)` (a macro) under the signature of a linear layer: qw (uint32) and qs
    (`scale_dtype`) of the given shapes, x [.., k], r if `residual` (y's rows and n columns, or [n] with BIAS), y
    [.., n_out or n], float32, rows laid out as `layout`; `rows` is the row count R (1 for "11"), r None without an
    addend. Only the signature asked for is built (the macros expand `r` per epilogue)."""
    n_out = n_out or n

    def nrows(rows):
        return T.int64(1) if layout == "11" else rows

    def r_shape(rows):
        return (T.int64(n),) if residual == BIAS else dims(layout, rows) + (T.int64(n),)

    if residual:
        @T.prim_func(private=True, s_tir=True)
        def with_addend(qw: T.Buffer(qw_shape, "uint32"), qs: T.Buffer(qs_shape, scale_dtype), x_h: T.handle,
                        r_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True})
            R = T.int64()
            x = T.match_buffer(x_h, dims(layout, R) + (T.int64(k),), "float32")
            r = T.match_buffer(r_h, r_shape(R), "float32")
            y = T.match_buffer(y_h, dims(layout, R) + (T.int64(n_out),), "float32")
            body(qw, qs, x, r, y, nrows(R))
        return with_addend

    @T.prim_func(private=True, s_tir=True)
    def plain(qw: T.Buffer(qw_shape, "uint32"), qs: T.Buffer(qs_shape, scale_dtype), x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        x = T.match_buffer(x_h, dims(layout, R) + (T.int64(k),), "float32")
        y = T.match_buffer(y_h, dims(layout, R) + (T.int64(n_out),), "float32")
        body(qw, qs, x, None, y, nrows(R))
    return plain
