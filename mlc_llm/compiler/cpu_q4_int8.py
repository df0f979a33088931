"""GEMVs / GEMMs with int8 activations on AVX512-VNNI: the `decode_precision: int8` and `prefill_precision: int8`
options of the q4f32_cpu kernels.

The float32 decode kernel (`cpu_q4_blocked.py`) spends and + convert + FMA on every 16 weights: about as fast as
two cores stream memory, so slower than the memory of larger machines. Here each row of x is quantized per group of
32 K-values (scale max|x| / 127, round to nearest even, as llama.cpp's q8_0), and one `vpdpbusd` multiplies 64
unsigned weight nibbles by 64 signed int8 activations and adds them 4 by 4 into 16 int32 lanes: ~3.5x fewer
instructions per weight. The weights need no conversion: a word of the blocked layout holds K-values k .. k+7 of one
row (nibble j: k + j), so `w & 0x0F0F0F0F` has the bytes of k, k+2, k+4, k+6 and `(w >> 4) & 0x0F0F0F0F` those of
k+1, k+3, k+5, k+7, and x is packed in that order (two int32 per word). Per group
and row: y += s_w * s_x * (sum(q * xq) - 7 * sum(xq)) in float32. Software prefetch of the groups ahead as the
float32 kernel, where it pays (`cpu_q4_blocked.prefetch_pays`). From STEAL_MIN_BLOCKS blocks the block loop runs with
work stealing (`cpu.tasks.steal`), as the float32 kernels do; fewer, small tasks gain nothing from it.

Every row is computed the same way whatever the batch (one row, or tiles of ROW_TILE rows sharing the unpacked
weights, rows clamped on read and skipped on write), so a sequence's logits do not depend on its batch. The compiler
gives them the decode kernels (x of [B, 1, K]) with decode_precision int8, the prefill ones ([1, S, K]) with
prefill_precision int8.
"""
from __future__ import annotations

import functools
from typing import Optional

import tvm
from tvm.script import tirx as T

from . import cpu_gemv
from .cpu import linear
from .cpu.linear import BIAS, BLOCK, prefetch_groups
from .cpu.tasks import SERIAL_ROWS, steal
from .cpu.vecmath import as_f32

ROW_TILE = 4  # rows of x per pass when the batch has more than one
STEAL_MIN_BLOCKS = 16  # fewer 64-row blocks run on TVM's static split (`stealing`)


def supported(target: tvm.target.Target) -> bool:
    """Whether code for `target` may use AVX512-VNNI (Cascade Lake, Ice Lake and later Xeons; AMD Zen 4 and later)."""
    return target.kind.name == "llvm" and bool(tvm.target.codegen.target_has_features("avx512vnni", target))


def _dpbusd(acc, weights, x_word):
    """acc (int32x16) + the dot products of 4 unsigned bytes of `weights` (uint32x16) with 4 signed bytes of the
    int32 `x_word`, lane by lane. The byte operands are int8x64 (LLVM 22's signature of the intrinsic)."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret("int8x64", weights), T.reinterpret("int8x64", T.Broadcast(x_word, 16)))


@functools.lru_cache(maxsize=None)
def gemv_kernel(n: int, k: int, layout: str = "b1", residual=False, prefetch_ahead: bool = True,
                scale_dtype: str = "float32", stealing: bool = True) -> tvm.tirx.PrimFunc:
    """y = x . w^T (+ r if `residual`, + bias r [N] if BIAS) for q4f32_cpu weights (`qw uint32[N/64, K/8, 64]`,
    `qs[N/64, K/32, 64]` in `scale_dtype`: float32 or float16), x quantized to int8 per group of 32; rows of x, y, r
    on axis 0 ([R, 1, K]: decode, `layout` "b1") or 1 ([1, R, K]: prefill, "1s"). `prefetch_ahead`: prefetch the
    words and scales PREFETCH_GROUPS groups ahead in software. `stealing`: the block loop with work stealing (from
    STEAL_MIN_BLOCKS blocks)."""
    if layout not in ("b1", "1s"):
        raise ValueError(f"int8 GEMV layout '{layout}' is not b1 or 1s")
    if n % BLOCK or k % 32:
        raise ValueError(f"int8 GEMV needs N % {BLOCK} == 0 and K % 32 == 0 (N = {n}, K = {k})")
    nb, groups, words = n // BLOCK, k // 32, k // 8

    mask = T.Broadcast(T.uint32(0x0F0F0F0F), 16)
    four = T.Broadcast(T.uint32(4), 16)

    @T.macro
    def quantize_row(x, r, xw, xsc, xsm):
        """Row r of x -> per group: its scale, the sum of its int8 values, and the values packed in words."""
        mx = T.alloc_buffer((16,), "float32", scope="global")
        xq = T.alloc_buffer((32,), "int32", scope="global")
        for g in range(T.int64(groups)):
            for l in T.vectorized(16):
                mx[l] = T.max(T.fabs(x[r, g * 32 + l]), T.fabs(x[r, g * 32 + 16 + l]))
            for h in range(15):
                mx[14 - h] = T.max(mx[14 - h], mx[15 - h])
            xsc[r, g] = mx[0] / T.float32(127)
            inv = T.bind(T.Select(mx[0] > T.float32(0), T.float32(127) / mx[0], T.float32(0)))
            for l in T.vectorized(32):
                xq[l] = T.Cast("int32", T.nearbyint(x[r, g * 32 + l] * inv))
            xsm[r, g] = 0
            for l in range(32):
                xsm[r, g] = xsm[r, g] + xq[l]
            for w in range(4):
                for h in range(2):  # h = 0: K-values 0, 2, 4, 6 of the word; h = 1: 1, 3, 5, 7
                    xw[r, g * 4 + w, h] = (T.bitwise_and(xq[w * 8 + h], 255)
                                           | T.shift_left(T.bitwise_and(xq[w * 8 + h + 2], 255), 8)
                                           | T.shift_left(T.bitwise_and(xq[w * 8 + h + 4], 255), 16)
                                           | T.shift_left(xq[w * 8 + h + 6], 24))

    @T.macro
    def rows_pass(qw, qs, xw, xsc, xsm, y, r, blk, bo, t, rows):
        """Rows bo*t .. bo*t + t - 1 (clamped to `rows` on read, skipped on write) of block `blk`'s 64 outputs."""
        acc = T.alloc_buffer((t, 64), "float32", scope="global")
        acci = T.alloc_buffer((t, 64), "int32", scope="global")
        for bi in T.unroll(T.int64(t)):
            for l in T.vectorized(64):
                acc[bi, l] = T.float32(0)
        for g in range(T.int64(groups)):
            if prefetch_ahead:  # a Python condition: decided when built
                prefetch_groups(qw, qs, blk, g)
            for bi in T.unroll(T.int64(t)):
                for l in T.vectorized(64):
                    acci[bi, l] = 0
            for w in range(4):
                for v in T.unroll(4):
                    wv = T.bind(qw[blk, g * 4 + w, T.Ramp(v * 16, 1, 16)])
                    lo = T.bind(T.bitwise_and(wv, mask))
                    hi = T.bind(T.bitwise_and(T.shift_right(wv, four), mask))
                    for bi in T.unroll(T.int64(t)):
                        row = T.bind(T.min(bo * t + bi, rows - 1))
                        acci[bi, T.Ramp(v * 16, 1, 16)] = _dpbusd(_dpbusd(
                            acci[bi, T.Ramp(v * 16, 1, 16)], lo, xw[row, g * 4 + w, 0]), hi, xw[row, g * 4 + w, 1])
            for bi in T.unroll(T.int64(t)):
                row = T.bind(T.min(bo * t + bi, rows - 1))
                for l in T.vectorized(64):
                    acc[bi, l] = acc[bi, l] + as_f32(qs[blk, g, l], scale_dtype) * xsc[row, g] * T.Cast(
                        "float32", acci[bi, l] - 7 * xsm[row, g])
        for bi in range(T.int64(t)):
            if bo * t + bi < rows:
                for l in T.vectorized(64):
                    if residual == BIAS:
                        y[bo * t + bi, blk * 64 + l] = acc[bi, l] + r[blk * 64 + l]
                    elif residual:
                        y[bo * t + bi, blk * 64 + l] = r[bo * t + bi, blk * 64 + l] + acc[bi, l]
                    else:
                        y[bo * t + bi, blk * 64 + l] = acc[bi, l]

    @T.macro
    def block(blk, qw, qs, xw, xsc, xsm, y, r, rows):
        """All rows of block `blk`'s 64 outputs."""
        if rows == 1:
            rows_pass(qw, qs, xw, xsc, xsm, y, r, blk, T.int64(0), 1, rows)
        else:
            for bo in range((rows + ROW_TILE - 1) // ROW_TILE):
                rows_pass(qw, qs, xw, xsc, xsm, y, r, blk, bo, ROW_TILE, rows)

    @T.macro
    def rows_all(qw, qs, x, r, y, rows):
        xw = T.alloc_buffer((rows, words, 2), "int32")
        xsc = T.alloc_buffer((rows, groups), "float32")
        xsm = T.alloc_buffer((rows, groups), "int32")
        if rows < SERIAL_ROWS:
            for rr in range(rows):
                quantize_row(x, rr, xw, xsc, xsm)
        else:
            for rr in T.parallel(rows):
                quantize_row(x, rr, xw, xsc, xsm)
        if stealing and nb >= STEAL_MIN_BLOCKS:  # a Python condition: decided when built
            steal(T.int64(nb), block, (qw, qs, xw, xsc, xsm, y, r, rows))
        else:
            for blk in T.parallel(T.int64(nb)):
                block(blk, qw, qs, xw, xsc, xsm, y, r, rows)

    @T.macro
    def body(qw, qs, x3, r3, y3, rows):
        # [rows, width] views of the 3-D buffers, whichever axis holds the rows
        x = T.decl_buffer((rows, k), "float32", data=x3.data)
        y = T.decl_buffer((rows, n), "float32", data=y3.data)
        if residual is True:  # a Python condition: decided when built
            r = T.decl_buffer((rows, n), "float32", data=r3.data)
            rows_all(qw, qs, x, r, y, rows)
        else:
            rows_all(qw, qs, x, r3, y, rows)

    return linear.kernel(body, layout, residual, (nb, words, BLOCK), (nb, groups, BLOCK), scale_dtype, k, n)


def replace_int8_matmul(func: tvm.tirx.PrimFunc, layouts: tuple[str, ...],
                        prefetch_ahead: bool = True) -> Optional[tvm.tirx.PrimFunc]:
    """The int8 kernel for a stock blocked q4f32 (dequantize + NT_matmul [+ add]) kernel whose rows are laid out as
    one of `layouts` ("b1": decode, "1s": prefill), else None."""
    sig = cpu_gemv._signature(func, BLOCK)
    if sig is None or sig[2] not in layouts:
        return None
    return cpu_gemv.replace_stock(func, BLOCK, lambda *sig, scale_dtype: gemv_kernel(*sig, prefetch_ahead, scale_dtype),
                                  "q4_blocked64_int8")
