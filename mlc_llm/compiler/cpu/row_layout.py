"""How the int4 linear-layer kernels address rows of x, y and the epilogue's addend r, as TIR builders: rows on axis 0
("b1": [R, 1, *], a decode batch), on axis 1 ("1s": [1, R, *], a prefill) or one row ("11"); r is a residual of y's
shape, or a bias [N] (`BIAS`)."""
from __future__ import annotations

from tvm.script import tirx as T

LAYOUTS = ("b1", "1s", "11")
BIAS = "bias"  # the `residual` argument of the kernels: False, True (y = r + x.w^T) or BIAS (y = x.w^T + r[col])


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
