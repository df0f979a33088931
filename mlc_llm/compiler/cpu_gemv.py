"""Batch-tiled CPU kernels for the int4 (q4f32_1) linear layers: decode with several sequences, and prefill.

The rfactor schedule of `cpu_schedules.py` decodes the int4 weights again for every row of x (every sequence of a
decode batch, every token of a prefill), so its time grows linearly with the rows, and the decode of the weights (not
DRAM) is what limits it. The kernel written here decodes 16 weights of one output row into a register vector once per
K chunk and does the FMAs of a tile of 4 (2-4 rows) or 8 (more rows) rows of x with it, so the decode is shared by the
tile. Rows of the last tile are clamped on read (`min(r, R-1)`) and skipped on write, so any row count works with a
static register tile. One row (batch-1 decode, or the last-token lm_head of prefill) takes a branch *inside* the
parallel loop with the rfactor kernel's loop structure (a branch around two parallel nests was slower in TVM 0.27).
Each parallel task covers 4 blocks of 8 output rows, so its accumulators are allocated once per 32 rows.

The kernel is a `@T.prim_func` closure built for the shapes of the stock kernel it replaces, and it only replaces a
kernel that is structurally equal (`tvm_ffi.structural_equal`, attributes aside) to the stock dequantize + NT_matmul
[+ residual add] of the same shapes, written here as text in the form TVM's legalization produces; so a kernel with any
other dequantize formula, dtype or epilogue keeps the rfactor schedule. Measured with `bench/gemv_batched.py`
(docs/BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Callable, Optional

import tvm
import tvm_ffi

from tvm.script import tirx as T

from .cpu import linear
from .cpu.linear import BIAS
from .cpu.text import parse
from .cpu.vecmath import as_f32

LANES = 16  # float32 lanes of an AVX-512 register
ROWS = 8  # output rows per parallel task
TILES = (4, 8)  # rows of x sharing one decoded weight vector: 4 for 2-4 rows, 8 above (bench/gemv_batched.py)
SCALE_DTYPES = ("float32", "float16")  # q4f32_* / q4f32_cpu_f16scale
KERNEL_ATTR = "mlc_llm.cpu_kernel"  # marks the kernels replaced here (tests look for it)
GROUP = 4  # row blocks per parallel task (a task allocates its accumulators once)

_HEADER = """
@T.prim_func(private=True, s_tir=True)
def main(qw: T.Buffer(({qw_shape}), "uint32"), qs: T.Buffer(({qs_shape}), "{scale_dtype}"),
         x_h: T.handle, {res_param}y_h: T.handle):
    T.func_attr({{"tirx.noalias": True}})
    {rdef}
    x = T.match_buffer(x_h, ({xs}, T.int64({k})), "float32")
    {res_buf}
    y = T.match_buffer(y_h, ({xs}, T.int64({n})), "float32")
"""

# The stock kernel (what LegalizeOps + FuseOps + FuseTIR produce for our q4 dequantize and the NT matmul); {w} and
# {s} are the word and the scale of weight [v_n, v_j] in the storage layout (`_weight_refs`), {sv} the scale as float32.
_STOCK = """
    dequantize_intermediate = T.sblock_alloc_buffer((T.int64({n}), T.int64({k})))
    {mm_alloc}for n, j in T.grid(T.int64({n}), T.int64({k})):
        with T.sblock("dequantize"):
            v_n, v_j = T.axis.remap("SS", [n, j])
            T.reads({w}, {s})
            T.writes(dequantize_intermediate[v_n, v_j])
            dequantize_intermediate[v_n, v_j] = (T.Cast("float32", {w} >> T.Cast("uint32", v_j % T.int64(8) * T.int64(4)) & T.uint32(15)) - T.float32(7.0)) * {sv}
    for i0, i1, i2, k in T.grid({xs}, T.int64({n}), T.int64({k})):
        with T.sblock("NT_matmul"):
            v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
            T.reads(x[v_i0, v_i1, v_k], dequantize_intermediate[v_i2, v_k])
            T.writes({mm}[v_i0, v_i1, v_i2])
            with T.init():
                {mm}[v_i0, v_i1, v_i2] = T.float32(0.0)
            {mm}[v_i0, v_i1, v_i2] = {mm}[v_i0, v_i1, v_i2] + x[v_i0, v_i1, v_k] * dequantize_intermediate[v_i2, v_k]
"""
_STOCK_ADD = """
    for ax0, ax1, ax2 in T.grid({xs}, T.int64({n})):
        with T.sblock("T_add"):
            v_ax0, v_ax1, v_ax2 = T.axis.remap("SSS", [ax0, ax1, ax2])
            T.reads(r[v_ax0, v_ax1, v_ax2], NT_matmul_intermediate[v_ax0, v_ax1, v_ax2])
            T.writes(y[v_ax0, v_ax1, v_ax2])
            y[v_ax0, v_ax1, v_ax2] = r[v_ax0, v_ax1, v_ax2] + NT_matmul_intermediate[v_ax0, v_ax1, v_ax2]
"""

# The bias epilogue (a linear layer with a bias, e.g. Qwen2's q/k/v): y = x . w^T + bias, bias [N] in r's place.
_STOCK_BIAS = """
    for ax0, ax1, ax2 in T.grid({xs}, T.int64({n})):
        with T.sblock("T_add"):
            v_ax0, v_ax1, v_ax2 = T.axis.remap("SSS", [ax0, ax1, ax2])
            T.reads(NT_matmul_intermediate[v_ax0, v_ax1, v_ax2], r[v_ax2])
            T.writes(y[v_ax0, v_ax1, v_ax2])
            y[v_ax0, v_ax1, v_ax2] = NT_matmul_intermediate[v_ax0, v_ax1, v_ax2] + r[v_ax2]
"""

def _shapes(layout: str) -> tuple[str, str, str]:
    """(definition of the row var, the leading two dims of x/y, the row count expression)."""
    if layout == "11":
        return "", "T.int64(1), T.int64(1)", "T.int64(1)"
    xs = "R, T.int64(1)" if layout == "b1" else "T.int64(1), R"
    return "R = T.int64()", xs, "R"


def _weight_shapes(n: int, k: int, block: int) -> tuple[str, str]:
    """Shapes of q_weight and q_scale: NK `[N, K/8]`, `[N, K/32]` (block 0) or `[N/block, K/8, block]`, ..."""
    if block:
        return (f"T.int64({n // block}), T.int64({k // 8}), T.int64({block})",
                f"T.int64({n // block}), T.int64({k // 32}), T.int64({block})")
    return f"T.int64({n}), T.int64({k // 8})", f"T.int64({n}), T.int64({k // 32})"


def _weight_refs(block: int) -> tuple[str, str]:
    """The word and the scale of weight [v_n, v_j] in the stock kernel, for the storage layout."""
    if block:
        b, i = f"v_n // T.int64({block})", f"v_n % T.int64({block})"
        return f"qw[{b}, v_j // T.int64(8), {i}]", f"qs[{b}, v_j // T.int64(32), {i}]"
    return "qw[v_n, v_j // T.int64(8)]", "qs[v_n, v_j // T.int64(32)]"


def scale_text(ref: str, scale_dtype: str) -> str:
    """TIR text of the weight scale `ref` (an element of qs) as float32, as `vecmath.as_f32` builds it."""
    return ref if scale_dtype == "float32" else f'T.Cast("float32", {ref})'


def _source(body: str, n: int, k: int, layout: str, residual, block: int = 0, scale_dtype: str = "float32") -> str:
    """The function header (parameters for these shapes, this weight layout and scale dtype) followed by `body`."""
    rdef, xs, _ = _shapes(layout)
    qw_shape, qs_shape = _weight_shapes(n, k, block)
    r_shape = f"T.int64({n})," if residual == BIAS else f"{xs}, T.int64({n})"
    return _HEADER.format(
        n=n, k=k, qw_shape=qw_shape, qs_shape=qs_shape, scale_dtype=scale_dtype, rdef=rdef, xs=xs,
        res_param="r_h: T.handle, " if residual else "",
        res_buf=f"r = T.match_buffer(r_h, ({r_shape}), \"float32\")" if residual else "") + body


def stock_kernel(n: int, k: int, layout: str, residual: bool, block: int = 0,
                 scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """The unscheduled kernel this module knows how to replace (for the equivalence check)."""
    return parse(stock_source(n, k, layout, residual, block, scale_dtype))


def stock_source(n: int, k: int, layout: str, residual: bool, block: int = 0, scale_dtype: str = "float32") -> str:
    """The stock dequantize + NT_matmul [+ residual add] for weights in the NK (block 0) or row-blocked layout, with
    scales in `scale_dtype`."""
    xs = _shapes(layout)[1]
    w, sc = _weight_refs(block)
    mm_alloc = f"NT_matmul_intermediate = T.sblock_alloc_buffer(({xs}, T.int64({n})))\n    " if residual else ""
    body = _STOCK.format(n=n, k=k, xs=xs, w=w, s=sc, sv=scale_text(sc, scale_dtype),
                         mm="NT_matmul_intermediate" if residual else "y", mm_alloc=mm_alloc)
    if residual:
        body += (_STOCK_BIAS if residual == BIAS else _STOCK_ADD).format(n=n, xs=xs)
    return _source(body, n, k, layout, residual, block, scale_dtype)


def tiled_kernel(n: int, k: int, layout: str, residual, tiles: tuple[int, ...] = TILES,
                 scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """The batch-tiled kernel: one parallel task per GROUP blocks of ROWS output rows; inside it a branch on the row
    count R: one row, R <= tiles[0] rows in tiles of tiles[0] (with two tile sizes), and tiles of tiles[-1] rows for
    more. Each branch allocates accumulators sized for its tile once per task (so the one-row path does not carry
    the 8-row tile's 4 KB buffer), then walks the task's GROUP row blocks."""
    if layout not in linear.LAYOUTS:
        raise ValueError(f"row-tiled q4 kernel layout '{layout}' is not one of {linear.LAYOUTS}")
    if len(tiles) not in (1, 2):
        raise ValueError(f"tiles: one or two row-tile sizes, not {tiles}")
    group = GROUP if n % (ROWS * GROUP) == 0 else 1

    def at(row, col):
        return linear.at(layout, row, col)

    def start(r, row, col):  # y's value before the sum: the epilogue's addend, or 0
        return linear.addend(residual, r, layout, row, col) if residual else T.float32(0)

    def weight(qw, qs, nb, ni, k0, l):  # weight [nb * ROWS + ni, k0 * LANES + l], dequantized
        word = qw[nb * ROWS + ni, (k0 * LANES + l) // 8]
        nibble = word >> T.Cast("uint32", (k0 * LANES + l) % 8 * 4) & T.uint32(15)
        scale = as_f32(qs[nb * ROWS + ni, (k0 * LANES + l) // 32], scale_dtype)
        return (T.Cast("float32", nibble) - T.float32(7)) * scale

    @T.macro
    def one_row(qw, qs, x, r, y, nb, acc):
        for ni in range(ROWS):
            for l in T.vectorized(LANES):
                acc[0, ni, l] = T.float32(0)
            for k0 in range(T.int64(k // LANES)):
                for l in T.vectorized(LANES):
                    acc[0, ni, l] = acc[0, ni, l] + x[at(0, k0 * LANES + l)] * weight(qw, qs, nb, ni, k0, l)
            y[at(0, nb * ROWS + ni)] = start(r, 0, nb * ROWS + ni)
            for l in range(LANES):
                y[at(0, nb * ROWS + ni)] = y[at(0, nb * ROWS + ni)] + acc[0, ni, l]

    @T.macro
    def row_tiles(qw, qs, x, r, y, rows, nb, acc, t):
        """Tiles of t rows of x sharing each decoded weight vector (rows past R clamped on read, not written)."""
        for bo in range((rows + T.int64(t - 1)) // T.int64(t)):
            for bi, ni in T.grid(t, ROWS):
                for l in T.vectorized(LANES):
                    acc[bi, ni, l] = T.float32(0)
            for ni in range(ROWS):
                for k0 in range(T.int64(k // LANES)):
                    for bi in T.unroll(t):
                        for l in T.vectorized(LANES):
                            acc[bi, ni, l] = acc[bi, ni, l] + x[at(T.min(bo * t + bi, rows - T.int64(1)),
                                                                   k0 * LANES + l)] * weight(qw, qs, nb, ni, k0, l)
            for bi in range(t):
                if bo * t + bi < rows:
                    for ni in range(ROWS):
                        y[at(bo * t + bi, nb * ROWS + ni)] = start(r, bo * t + bi, nb * ROWS + ni)
                        for l in range(LANES):
                            y[at(bo * t + bi, nb * ROWS + ni)] = y[at(bo * t + bi, nb * ROWS + ni)] + acc[bi, ni, l]

    @T.macro
    def blocks(qw, qs, x, r, y, rows, task, t):
        acc = T.alloc_buffer((t, ROWS, LANES), "float32", scope="global")
        for nbi in range(T.int64(group)):
            nb = T.bind(task * T.int64(group) + nbi)
            if t == 1:  # a Python condition: decided when built
                one_row(qw, qs, x, r, y, nb, acc)
            else:
                row_tiles(qw, qs, x, r, y, rows, nb, acc, t)

    @T.macro
    def body(qw, qs, x, r, y, rows):
        for task in T.parallel(T.int64(n // (ROWS * group))):
            if rows == T.int64(1):
                blocks(qw, qs, x, r, y, rows, task, 1)
            else:
                if len(tiles) == 2:
                    if rows <= T.int64(tiles[0]):
                        blocks(qw, qs, x, r, y, rows, task, tiles[0])
                    else:
                        blocks(qw, qs, x, r, y, rows, task, tiles[-1])
                else:
                    blocks(qw, qs, x, r, y, rows, task, tiles[-1])

    return linear.kernel(body, layout, residual, (T.int64(n), T.int64(k // 8)), (T.int64(n), T.int64(k // 32)),
                         scale_dtype, k, n)


def _signature(func: tvm.tirx.PrimFunc, block: int = 0) -> Optional[tuple[int, int, str, bool]]:
    """(N, K, layout, residual) when the kernel's parameters have the shapes of a q4f32 linear layer with weights in
    the NK layout (block 0) or in blocks of `block` rows (scales in one of SCALE_DTYPES); residual:
    False, True (a residual add) or BIAS."""
    bufs = list(func.params) if len(func.params) in (4, 5) else []  # TVM 0.27 tirx: params are the buffers
    dtypes = [str(b.dtype) for b in bufs]
    if not bufs or dtypes[0] != "uint32" or dtypes[1] not in SCALE_DTYPES or set(dtypes[2:]) != {"float32"}:
        return None
    shapes = [list(b.shape) for b in bufs]
    bias = len(shapes) == 5 and len(shapes[3]) == 1
    if any(len(s) != (3 if block else 2) for s in shapes[:2]) or any(
            len(s) != 3 for i, s in enumerate(shapes[2:], 2) if not (bias and i == 3)):
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for s in shapes[:2] for d in s):
        return None
    if block and int(shapes[0][2]) != block:
        return None
    n, k = int(shapes[0][0]) * (block or 1), int(shapes[0][1]) * 8
    if n % ROWS or k % 32 or not isinstance(shapes[2][2], tvm.tirx.IntImm) or int(shapes[2][2]) != k:
        return None
    if bias and not (isinstance(shapes[3][0], tvm.tirx.IntImm) and int(shapes[3][0]) == n):
        return None
    d0, d1 = shapes[2][0], shapes[2][1]
    one = lambda d: isinstance(d, tvm.tirx.IntImm) and int(d) == 1  # noqa: E731
    layout = "11" if one(d0) and one(d1) else "1s" if one(d0) else "b1" if one(d1) else None
    if layout is None:
        return None
    return n, k, layout, BIAS if bias else len(bufs) == 5


def scale_dtype_of(func: tvm.tirx.PrimFunc) -> str:
    """The dtype of a q4 kernel's second parameter, its scales (`SCALE_DTYPES` in the kernels of this package)."""
    return str(func.params[1].dtype) if len(func.params) > 1 else ""


def replace_stock(func: tvm.tirx.PrimFunc, block: int, make: Callable[..., tvm.tirx.PrimFunc],
                  mark: str) -> Optional[tvm.tirx.PrimFunc]:
    """`make(N, K, layout, residual, scale_dtype=...)` in place of `func` if `func` is the stock q4f32 dequantize +
    NT_matmul [+ add] of the weight layout `block` (structurally equal, attributes aside), with `func`'s attributes and
    `mark`; else None."""
    sig = _signature(func, block)
    if sig is None:
        return None

    def strip(f: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:  # compare parameters and body, not attributes
        return tvm.tirx.PrimFunc(f.params, f.body)

    sd = scale_dtype_of(func)
    if not tvm_ffi.structural_equal(strip(func), strip(stock_kernel(*sig, block, sd)), map_free_vars=True):
        return None
    kernel = make(*sig, scale_dtype=sd)
    for key, value in func.attrs.items():  # keep the stock kernel's attributes (symbol, op pattern, ...)
        kernel = kernel.with_attr(key, value)
    return kernel.with_attr(KERNEL_ATTR, mark)


def replace_q4_matmul(func: tvm.tirx.PrimFunc) -> Optional[tvm.tirx.PrimFunc]:
    """The batch-tiled kernel for a stock q4f32 (dequantize + NT_matmul [+ add]) kernel, or None if `func` is not one."""
    return replace_stock(func, 0, tiled_kernel, "q4_row_tiled")
