"""CPU kernels for int4 weights stored in 64-row blocks (the `q4f32_cpu` quantization): decode GEMV and prefill.

`q4f32_1` stores a weight as `q_weight uint32[N, K/8]`, `q_scale[N, K/32]` (MLC's NK layout). Its kernels
(`cpu_gemv.py`) vectorize over K: 6 vector instructions to decode 16 weights (shift, and, convert, subtract the zero
point, multiply by a scale gathered per group) before the FMA, and a horizontal sum per output. `q4f32_cpu` stores the
same numbers (same quantize formula, same scales) as `q_weight uint32[N/64, K/8, 64]`, `q_scale[N/64, K/32, 64]`:
64 output rows are contiguous, and a 16-lane vector holds the same word of 16 consecutive rows, so
- the weight stream of one parallel task is one contiguous run of memory;
- the nibble j of 16 rows is `float(q & (15 << 4j))` = nibble * 16^j: x is pre-scaled by 16^-j once per group of 32
  (a vector multiply by constants), so decoding needs no shift and no zero-point subtraction: and, convert, FMA —
  3 instructions per 16 weights;
- the zero point and the scale apply once per group: `acc += s * (partial - 7 * sum(x of the group))`, with the scale
  vector loaded contiguously.
With several rows of x (batched decode, short prefill) one decoded weight vector feeds a tile of 4 rows, as in
`cpu_gemv.py`: clamped rows on read, skipped on write. From PANEL_MIN rows (prefill) a task dequantizes its block once
into a float32 panel and runs a 6 x 64 register-tiled GEMM on it (24 FMAs per 4 panel loads and 6 broadcasts); on CPUs
with AMX-BF16 those rows run on tiles instead (`amx_gemm`, x in two bfloat16 parts times the integer weights, scaled
per group).

The kernel is one `@T.prim_func` closure per shape and variant (`blocked_kernel`), its paths `@T.macro`s; Python
conditions in them (`if silu:`) are decided when the kernel is built. It replaces only kernels structurally equal to the
stock dequantize + NT_matmul [+ residual add] of the blocked layout (`cpu_gemv.replace_stock` with block 64; the NK
kernels use it with block 0). Rows of N that are not a multiple of 64 keep the NK layout (`Quantization.blocked`) and
the NK kernels.
"""
from __future__ import annotations

from typing import Optional

import tvm
from tvm.script import tirx as T

from . import cpu_gemv
from .cpu import linear
from .cpu.amx import amx_op, bf16_parts, bf16x32, request_amx, round_bf16, tile_config
from .cpu.linear import BLOCK, prefetch_groups
from .cpu.tasks import run_tasks, steal
from .cpu.vecmath import as_f32, silu_mul

# (row tile, 16-row vectors per pass) for R == 1 and for R > 1: a tile's partial sums (t * v vectors) stay in
# registers (4 x 4 beat the other tilings tried: bench/gemv_batched.py).
PLANS = ((1, 4), (4, 4))

# Prefill (R >= PANEL_MIN rows): a task dequantizes its 64-row block once into a float32 panel [K, 64] and runs a
# register-tiled GEMM on it, PANEL_TILE rows x 64 columns (24 accumulators, 4 panel loads and 6 broadcasts per
# 24 FMAs). Tasks are (block, chunk of PANEL_CHUNK rows), so the 9 blocks of N=576 still keep 2+ threads busy; each
# chunk's task dequantizes the block again (a few microseconds against ~50 us of FMAs at 48 rows).
PANEL_MIN = 16
PANEL_TILE = 6
PANEL_CHUNK = 48

# Prefill precisions of the AMX GEMM (`amx_gemm`): "f32" (the default: logits as with float32 FMAs) or "bf16" (x and
# the dequantized w rounded to bfloat16, as PyTorch's bf16 matmuls: faster, ~2e-3 relative error per GEMM). Without
# AMX both run the float32 kernels.
PRECISIONS = ("f32", "bf16")
AMX_CHUNK_ROWS = 256  # rows of x per task: ceil(256 / tile rows) tiles
AMX_TILE_ROWS = 14  # rows per tile of the f32 kernel (the bf16 one: 16)


def _tile_row(t: int, bo, bi, rows):
    """Row `bi` of tile `bo` of `t` rows, clamped to the last row (the rows past it are computed, not written);
    with t == 1, row 0."""
    return T.min(bo * t + bi, rows - T.int64(1)) if t > 1 else T.int64(0)


def _lane_sum(buf, bi):
    """buf[bi, 0] + ... + buf[bi, 15]."""
    total = buf[bi, 0]
    for i in range(1, 16):
        total = total + buf[bi, i]
    return total


def _nibble(qw, blk, g, k2, ct, l, j: int):
    """The integer weight q - 7 (-7..8) of K-value 2 * (k2 % 4) + j of word g * 4 + k2 // 4, row ct * 16 + l of
    block blk, as float32."""
    return T.Cast("float32", T.bitwise_and(T.shift_right(qw[blk, g * 4 + k2 // 4, ct * 16 + l],
                                                        T.Cast("uint32", (k2 % 4) * 8 + 4 * j)),
                                          T.uint32(15))) - T.float32(7)


def prefetch_pays(target: tvm.target.Target) -> bool:
    """Whether the decode GEMVs prefetch the groups ahead in software: it paid on the Intel VMs and made decode slower
    on AMD Zen 4 (docs/BENCHMARKS.md)."""
    return not str(target.attrs.get("mcpu", "")).startswith("znver")


def blocked_kernel(n: int, k: int, layout: str, residual, plans=PLANS, panel_min: int = PANEL_MIN,
                   amx: bool = False, precision: str = "f32", prefetch_ahead: bool = True,
                   scale_dtype: str = "float32", silu: bool = False) -> tvm.tirx.PrimFunc:
    """y = x . w^T [+ r] for `q4f32_cpu` weights (`qw uint32[N/64, K/8, 64]`, `qs[N/64, K/32, 64]` in `scale_dtype`),
    rows of x on axis 0 ("b1"), axis 1 ("1s") or one row ("11"); `residual`: False, True (+ r [rows, N]) or BIAS
    (+ r [N]). Below `panel_min` rows: one task per 64-row block (work stealing), inside it a branch on the row count
    R: one row (plans[0]: (row tile, 16-row vectors per pass)) or tiles of rows (plans[1]). From `panel_min` rows:
    the panel GEMM, parallel over (chunk of PANEL_CHUNK rows, block). Two parallel nests under one branch: bound
    inside one parallel loop (task = chunk * blocks + block) the decode paths were slower (bench/gemv_batched.py).
    `panel_min=0`: no panel GEMM (for comparisons). `amx`: from `panel_min` rows the AMX GEMM in `precision`
    (PRECISIONS), with the panel GEMM as its fallback. `prefetch_ahead`: software prefetch in the GEMV paths
    (`prefetch_pays`). `silu`: see `fused_silu_kernel`."""
    if layout not in linear.LAYOUTS:
        raise ValueError(f"blocked q4 kernel layout '{layout}' is not b1, 1s or 11")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown prefill precision '{precision}' (allowed: {', '.join(PRECISIONS)})")
    if len(plans) != 2:
        raise ValueError(f"plans: one for one row and one for more rows, not {plans}")
    if silu and (residual or n % (2 * BLOCK)):
        raise ValueError(f"gate_up + silu needs no residual and N a multiple of {2 * BLOCK} (N = {n})")
    nb, groups = n // BLOCK, k // 32
    gemv_only = layout == "11" or not panel_min

    def at(row, col):
        return linear.at(layout, row, col)

    # --- GEMV paths (fewer than panel_min rows): row tiles of t rows share each decoded weight vector
    @T.macro
    def gemv_pass(qw, qs, x, r, out, rows, blk, bo, p, t, v, acc, part, wv, xs, xsum):
        """Tile bo of t rows of x times the 16 * v rows of pass p of block blk; x is pre-scaled by 2^(-4 (rr % 8)),
        built from its exponent bits."""
        for bi in T.unroll(t):
            for vi in T.unroll(v):
                for l in T.vectorized(16):
                    acc[bi, vi * 16 + l] = T.float32(0)
        for g in range(T.int64(groups)):
            if prefetch_ahead:  # a Python condition: decided when built
                prefetch_groups(qw, qs, blk, g)
            for bi in T.unroll(t):
                for rr in T.vectorized(32):
                    xs[bi, rr] = x[at(_tile_row(t, bo, bi, rows), g * 32 + rr)] * T.reinterpret(
                        "float32", T.shift_left(T.Cast("uint32", 127 - 4 * (rr % 8)), T.uint32(23)))
                for l in T.vectorized(16):
                    xsum[bi, l] = (x[at(_tile_row(t, bo, bi, rows), g * 32 + l)]
                                   + x[at(_tile_row(t, bo, bi, rows), g * 32 + 16 + l)])
                for vi in T.unroll(v):
                    for l in T.vectorized(16):
                        part[bi, vi * 16 + l] = T.float32(0)
            for w in range(4):
                for j in T.unroll(8):
                    for vi in T.unroll(v):
                        for l in T.vectorized(16):  # nibble j of 16 rows: q * 16^j
                            wv[vi * 16 + l] = T.Cast("float32", T.bitwise_and(
                                qw[blk, g * 4 + w, p * (16 * v) + vi * 16 + l],
                                T.shift_left(T.uint32(15), T.Cast("uint32", j * 4))))
                        for bi in T.unroll(t):
                            for l in T.vectorized(16):
                                part[bi, vi * 16 + l] = part[bi, vi * 16 + l] + wv[vi * 16 + l] * xs[bi, w * 8 + j]
            for bi in T.unroll(t):
                for vi in T.unroll(v):
                    for l in T.vectorized(16):
                        acc[bi, vi * 16 + l] = acc[bi, vi * 16 + l] + as_f32(
                            qs[blk, g, p * (16 * v) + vi * 16 + l], scale_dtype) * (
                            part[bi, vi * 16 + l] - T.float32(7) * _lane_sum(xsum, bi))
        for bi in range(t):
            if t > 1:  # rows of the last tile past R were computed on clamped rows: not written
                if bo * t + bi < rows:
                    for i in range(16 * v):
                        out[at(bo * t + bi, blk * BLOCK + p * (16 * v) + i)] = linear.plus(
                            residual, r, layout, bo * t + bi, blk * BLOCK + p * (16 * v) + i, acc[bi, i])
            else:
                for i in range(16 * v):
                    out[at(T.int64(0), blk * BLOCK + p * (16 * v) + i)] = linear.plus(
                        residual, r, layout, T.int64(0), blk * BLOCK + p * (16 * v) + i, acc[bi, i])

    @T.macro
    def gemv(qw, qs, x, r, out, rows, blk, t, v):
        """All rows of block blk, in tiles of t rows, 16 * v output rows per pass."""
        acc = T.alloc_buffer((t, 16 * v), "float32", scope="global")
        part = T.alloc_buffer((t, 16 * v), "float32", scope="global")
        wv = T.alloc_buffer((16 * v,), "float32", scope="global")
        xs = T.alloc_buffer((t, 32), "float32", scope="global")
        xsum = T.alloc_buffer((t, 16), "float32", scope="global")
        if t > 1:
            for bo in range((rows + T.int64(t - 1)) // T.int64(t)):
                for p in range(BLOCK // (16 * v)):
                    gemv_pass(qw, qs, x, r, out, rows, blk, bo, p, t, v, acc, part, wv, xs, xsum)
        else:
            for bo in range(1):
                for p in range(BLOCK // (16 * v)):
                    gemv_pass(qw, qs, x, r, out, rows, blk, bo, p, t, v, acc, part, wv, xs, xsum)

    @T.macro
    def gemv_block(blk, qw, qs, x, r, out, rows):
        """A task of the stealing loop."""
        if rows == T.int64(1):
            gemv(qw, qs, x, r, out, rows, blk, *plans[0])
        else:
            gemv(qw, qs, x, r, out, rows, blk, *plans[1])

    @T.macro
    def gemv_all(qw, qs, x, r, out, rows):
        if layout == "11":
            for blk in T.parallel(T.int64(nb)):
                gemv(qw, qs, x, r, out, rows, blk, *plans[0])
        else:
            steal(T.int64(nb), gemv_block, (qw, qs, x, r, out, rows))

    # --- the panel GEMM (from panel_min rows, and where AMX is refused)
    @T.macro
    def panel_all(qw, qs, x, r, out, rows):
        """Rows [ch * PANEL_CHUNK, min(R, (ch + 1) * PANEL_CHUNK)) of block blk per task: the block dequantized into
        a panel [K, 64], then tiles of PANEL_TILE rows (the last tile's rows past R clamped on read, skipped on
        write)."""
        for task in T.parallel(T.int64(nb) * ((rows + T.int64(PANEL_CHUNK - 1)) // T.int64(PANEL_CHUNK))):
            blk = T.bind(task % T.int64(nb))
            ch = T.bind(task // T.int64(nb))
            wp = T.alloc_buffer((T.int64(k), 64), "float32")
            acc = T.alloc_buffer((PANEL_TILE, 64), "float32", scope="global")
            for g in range(T.int64(groups)):
                for w in range(4):
                    for j in T.unroll(8):
                        for l in T.vectorized(64):
                            wp[g * 32 + w * 8 + j, l] = (T.Cast("float32", T.bitwise_and(T.shift_right(
                                qw[blk, g * 4 + w, l], T.Cast("uint32", j * 4)), T.uint32(15))) - T.float32(7)) * \
                                as_f32(qs[blk, g, l], scale_dtype)
            for bo in range(T.min(T.int64(PANEL_CHUNK // PANEL_TILE),
                                  (rows - ch * T.int64(PANEL_CHUNK) + T.int64(PANEL_TILE - 1)) // T.int64(PANEL_TILE))):
                for bi in T.unroll(PANEL_TILE):
                    for l in T.vectorized(64):
                        acc[bi, l] = T.float32(0)
                for kk in range(T.int64(k)):
                    for bi in T.unroll(PANEL_TILE):
                        for v in T.unroll(4):
                            for l in T.vectorized(16):
                                acc[bi, v * 16 + l] = acc[bi, v * 16 + l] + x[at(T.min(
                                    ch * T.int64(PANEL_CHUNK) + bo * PANEL_TILE + bi, rows - T.int64(1)), kk)] * \
                                    wp[kk, v * 16 + l]
                for bi in range(PANEL_TILE):
                    if ch * T.int64(PANEL_CHUNK) + bo * PANEL_TILE + bi < rows:
                        for i in range(64):
                            out[at(ch * T.int64(PANEL_CHUNK) + bo * PANEL_TILE + bi, blk * 64 + i)] = linear.plus(
                                residual, r, layout, ch * T.int64(PANEL_CHUNK) + bo * PANEL_TILE + bi, blk * 64 + i,
                                acc[bi, i])

    # --- the gated activation (silu): a path writes the gate_up scratch gu [rows, N], then y = silu(gate) * up
    @T.macro
    def through_scratch(path, qw, qs, x, r, y, rows):
        if silu:  # a Python condition: decided when built
            gu = T.alloc_buffer(linear.dims(layout, rows) + (T.int64(n),), "float32")
            path(qw, qs, x, r, gu, rows)
            for row in T.parallel(rows):
                for cc in range(n // 2 // 16):
                    for l in T.vectorized(16):
                        y[at(row, cc * 16 + l)] = silu_mul(gu[at(row, cc * 16 + l)],
                                                           gu[at(row, T.int64(n // 2) + cc * 16 + l)])
        else:
            path(qw, qs, x, r, y, rows)

    # --- the AMX GEMM (from panel_min rows on CPUs with AMX-BF16): `amx_gemm`
    f32 = precision == "f32"
    tr = AMX_TILE_ROWS if f32 else 16  # rows per tile
    sides, nbs = (2, nb // 2) if silu else (1, nb)  # silu: a task computes gate block blk and up block blk + nbs
    cht = -(-AMX_CHUNK_ROWS // tr)  # row tiles per task
    cfg_rows = (tr,) * 6 + (16, 16) if f32 else (16,) * 8  # tiles 0-5: x rows and sums; 6-7: weights
    parts = 2 if f32 else 1  # x in bfloat16: hi and lo (f32) or rounded (bf16)

    def mtiles(rows):
        return (rows + T.int64(tr - 1)) // T.int64(tr)

    def wblock(blk, side):  # the weight block of a side (silu: gate, up)
        return blk + side * T.int64(nbs) if silu else blk

    def sblock(blk, side: int):  # the scale block of a side
        return blk + T.int64(nbs) if side else blk

    @T.macro
    def amx_thread(tasks, body, args):
        """Once per thread with tasks: the tile configuration, the weight panel, the scratch of the group sums."""
        tile_config(cfg_rows)
        wh = T.alloc_buffer((sides, groups, 4, 16, 16), "uint32")
        if f32:
            # two buffers of 1 KB or less for the sums, which TVM puts on the stack (a larger one goes to its
            # workspace, where LLVM cannot keep it in registers)
            cg = T.alloc_buffer((tr, 32), "float32")
            acc0 = T.alloc_buffer((tr, 16), "float32")
            acc1 = T.alloc_buffer((tr, 16), "float32")
            if silu:
                gb0 = T.alloc_buffer((tr, 16), "float32")
                gb1 = T.alloc_buffer((tr, 16), "float32")
                run_tasks(*tasks, body, args + (wh, cg, acc0, acc1, gb0, gb1))
            else:
                run_tasks(*tasks, body, args + (wh, cg, acc0, acc1, None, None))
        else:
            cb = T.alloc_buffer((16, 64), "float32")
            if silu:
                gb = T.alloc_buffer((16, 64), "float32")
                run_tasks(*tasks, body, args + (wh, cb, gb))
            else:
                run_tasks(*tasks, body, args + (wh, cb, None))
        T.evaluate(amx_op("tilerelease"))

    @T.macro
    def f32_group(qs, xa, wh, cg, acc0, acc1, mt, g, h, blk, side, first):
        """Group g of half h: x_hi.q + x_lo.q on zeroed tiles 0-1 (x hi/lo in 4-5, weights in 6-7), stored to cg,
        times the group's scales into acc0 / acc1 (set at the first group)."""
        T.evaluate(amx_op("tilezero", T.int8(0)))
        T.evaluate(amx_op("tilezero", T.int8(1)))
        T.evaluate(amx_op("tileloadd64", T.int8(4), T.address_of(xa[mt, g, 0, 0, 0]), T.int64(64)))
        T.evaluate(amx_op("tileloadd64", T.int8(5), T.address_of(xa[mt, g, 1, 0, 0]), T.int64(64)))
        T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(wh[side, g, h * 2, 0, 0]), T.int64(64)))
        T.evaluate(amx_op("tileloadd64", T.int8(7), T.address_of(wh[side, g, h * 2 + 1, 0, 0]), T.int64(64)))
        T.evaluate(amx_op("tdpbf16ps", T.int8(0), T.int8(4), T.int8(6)))
        T.evaluate(amx_op("tdpbf16ps", T.int8(1), T.int8(4), T.int8(7)))
        T.evaluate(amx_op("tdpbf16ps", T.int8(0), T.int8(5), T.int8(6)))
        T.evaluate(amx_op("tdpbf16ps", T.int8(1), T.int8(5), T.int8(7)))
        T.evaluate(amx_op("tilestored64", T.int8(0), T.address_of(cg[0, 0]), T.int64(128)))
        T.evaluate(amx_op("tilestored64", T.int8(1), T.address_of(cg[0, 16]), T.int64(128)))
        for mi in T.unroll(tr):
            for l in T.vectorized(16):
                if first:
                    acc0[mi, l] = as_f32(qs[sblock(blk, side), g, h * 32 + l], scale_dtype) * cg[mi, l]
                    acc1[mi, l] = as_f32(qs[sblock(blk, side), g, h * 32 + 16 + l], scale_dtype) * cg[mi, 16 + l]
                else:
                    acc0[mi, l] = acc0[mi, l] + as_f32(
                        qs[sblock(blk, side), g, h * 32 + l], scale_dtype) * cg[mi, l]
                    acc1[mi, l] = acc1[mi, l] + as_f32(
                        qs[sblock(blk, side), g, h * 32 + 16 + l], scale_dtype) * \
                        cg[mi, 16 + l]

    @T.macro
    def f32_sums(qs, xa, wh, cg, acc0, acc1, mt, h, blk, side):
        for g in range(1):
            f32_group(qs, xa, wh, cg, acc0, acc1, mt, g, h, blk, side, True)
        for g in range(1, groups):
            f32_group(qs, xa, wh, cg, acc0, acc1, mt, g, h, blk, side, False)

    @T.macro
    def bf16_sums(xa, wh, buf, mt, side):
        """One product of x and w (each rounded to bfloat16) over all groups, 64 columns on tiles 0-3, into buf."""
        T.evaluate(amx_op("tilezero", T.int8(0)))
        T.evaluate(amx_op("tilezero", T.int8(1)))
        T.evaluate(amx_op("tilezero", T.int8(2)))
        T.evaluate(amx_op("tilezero", T.int8(3)))
        for g in range(groups):
            T.evaluate(amx_op("tileloadd64", T.int8(4), T.address_of(xa[mt, g, 0, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(wh[side, g, 0, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(0), T.int8(4), T.int8(6)))
            T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(wh[side, g, 1, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(1), T.int8(4), T.int8(6)))
            T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(wh[side, g, 2, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(2), T.int8(4), T.int8(6)))
            T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(wh[side, g, 3, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(3), T.int8(4), T.int8(6)))
        T.evaluate(amx_op("tilestored64", T.int8(0), T.address_of(buf[0, 0]), T.int64(256)))
        T.evaluate(amx_op("tilestored64", T.int8(1), T.address_of(buf[0, 16]), T.int64(256)))
        T.evaluate(amx_op("tilestored64", T.int8(2), T.address_of(buf[0, 32]), T.int64(256)))
        T.evaluate(amx_op("tilestored64", T.int8(3), T.address_of(buf[0, 48]), T.int64(256)))

    @T.macro
    def unpack(qw, qs, wh, blk):
        """Block blk's integer weights (and its up block's with silu) into the VNNI panel wh, a 32-bit word per two
        consecutive K-values. f32: q - 7 (-7..8: exact in bfloat16), scaled per group later; bf16: q - 7 times the
        scale, rounded to bfloat16."""
        for side in range(sides):
            for g in range(groups):
                for k2 in range(16):
                    for ct in T.unroll(4):
                        for l in T.vectorized(16):
                            if f32:
                                wh[side, g, ct, k2, l] = T.shift_right(T.reinterpret("uint32", _nibble(
                                    qw, wblock(blk, side), g, k2, ct, l, 0)), T.uint32(16)) + T.reinterpret(
                                    "uint32", _nibble(qw, wblock(blk, side), g, k2, ct, l, 1))
                            else:
                                wh[side, g, ct, k2, l] = bf16_parts(
                                    _nibble(qw, wblock(blk, side), g, k2, ct, l, 0)
                                    * as_f32(qs[wblock(blk, side), g, ct * 16 + l], scale_dtype),
                                    _nibble(qw, wblock(blk, side), g, k2, ct, l, 1)
                                    * as_f32(qs[wblock(blk, side), g, ct * 16 + l], scale_dtype))[0]

    @T.macro
    def f32_task(task, qw, qs, xa, r, y, rows, wh, cg, acc0, acc1, gb0, gb1):
        """Block blk, row tiles of chunk c: per row tile and half of the block (32 columns) the group sums in
        acc0 / acc1 (with silu the gate's kept in gb0 / gb1 while the up side runs), written."""
        blk = T.bind(task % T.int64(nbs))
        c = T.bind(task // T.int64(nbs))
        unpack(qw, qs, wh, blk)
        for mt in range(c * T.int64(cht), T.min((c + 1) * T.int64(cht), mtiles(rows))):
            for h in range(2):
                f32_sums(qs, xa, wh, cg, acc0, acc1, mt, h, blk, 0)
                if silu:  # a Python condition: decided when built
                    for mi in T.unroll(tr):
                        for l in T.vectorized(16):
                            gb0[mi, l] = acc0[mi, l]
                            gb1[mi, l] = acc1[mi, l]
                    f32_sums(qs, xa, wh, cg, acc0, acc1, mt, h, blk, 1)
                for mi in T.unroll(tr):
                    if mt * tr + mi < rows:
                        for l in T.vectorized(16):
                            if silu:
                                y[at(mt * tr + mi, blk * 64 + h * 32 + l)] = silu_mul(gb0[mi, l], acc0[mi, l])
                                y[at(mt * tr + mi, blk * 64 + h * 32 + 16 + l)] = silu_mul(gb1[mi, l], acc1[mi, l])
                            else:
                                y[at(mt * tr + mi, blk * 64 + h * 32 + l)] = linear.plus(
                                    residual, r, layout, mt * tr + mi, blk * 64 + h * 32 + l, acc0[mi, l])
                                y[at(mt * tr + mi, blk * 64 + h * 32 + 16 + l)] = linear.plus(
                                    residual, r, layout, mt * tr + mi, blk * 64 + h * 32 + 16 + l, acc1[mi, l])

    @T.macro
    def bf16_task(task, qw, qs, xa, r, y, rows, wh, cb, gb):
        """Block blk, row tiles of chunk c: the products in cb (with silu the gate's in gb), written."""
        blk = T.bind(task % T.int64(nbs))
        c = T.bind(task // T.int64(nbs))
        unpack(qw, qs, wh, blk)
        for mt in range(c * T.int64(cht), T.min((c + 1) * T.int64(cht), mtiles(rows))):
            if silu:
                bf16_sums(xa, wh, gb, mt, 0)
                bf16_sums(xa, wh, cb, mt, 1)
            else:
                bf16_sums(xa, wh, cb, mt, 0)
            for mi in range(16):
                if mt * 16 + mi < rows:
                    for nn in range(64):
                        if silu:
                            y[at(mt * 16 + mi, blk * 64 + nn)] = silu_mul(gb[mi, nn], cb[mi, nn])
                        else:
                            y[at(mt * 16 + mi, blk * 64 + nn)] = linear.plus(residual, r, layout, mt * 16 + mi,
                                                                        blk * 64 + nn, cb[mi, nn])

    amx_task = f32_task if f32 else bf16_task

    @T.macro
    def amx_gemm(qw, qs, x, r, y, rows):
        """On CPUs with AMX-BF16. f32: a weight's q - 7 (-7..8) is exact in bfloat16 and a tile product (16x16x32)
        spans one group of 32 K-values, whose rows share a scale; so per group x in two bfloat16 parts (hi = rounded,
        lo = the rounded remainder: 2^-17 relative error, where splitting the weights too would double it) times the
        integer weights, then times the scales into float32 sums kept in vector registers (AMX_TILE_ROWS x 32 per
        half block: 16 x 64 would spill). x is converted once to tiles xa [row tile, group, hi/lo, tile row, 32];
        the tasks (block, chunk of row tiles) run with work stealing. Linux hands out the AMX state on request only:
        asked at each call (one syscall against >= 100 us of work), refused -> the panel GEMM."""
        perm = T.alloc_buffer((1,), "int64", scope="global")
        perm[0] = request_amx()
        if perm[0] == T.int64(0):
            xa = T.alloc_buffer((mtiles(rows), groups, parts, tr, 32), "uint16")
            for mt in T.parallel(mtiles(rows)):
                for g in range(groups):
                    for mi in range(tr):
                        if f32:
                            xl = T.alloc_buffer((32,), "float32")
                            for l in T.vectorized(32):
                                xl[l] = x[at(_tile_row(tr, mt, mi, rows), g * 32 + l)] - T.reinterpret(
                                    "float32", round_bf16(x[at(_tile_row(tr, mt, mi, rows), g * 32 + l)]))
                        xa[mt, g, 0, mi, T.ramp(0, 1, 32)] = bf16x32(
                            x[at(_tile_row(tr, mt, mi, rows), T.ramp(g * 32, 1, 16))],
                            x[at(_tile_row(tr, mt, mi, rows), T.ramp(g * 32 + 16, 1, 16))])
                        if f32:
                            xa[mt, g, 1, mi, T.ramp(0, 1, 32)] = bf16x32(xl[T.ramp(0, 1, 16)], xl[T.ramp(16, 1, 16)])
            steal(T.int64(nbs) * ((mtiles(rows) + T.int64(cht - 1)) // T.int64(cht)), amx_task,
                  (qw, qs, xa, r, y, rows), per_thread=amx_thread)
        else:
            through_scratch(panel_all, qw, qs, x, r, y, rows)

    @T.macro
    def body(qw, qs, x, r, y, rows):
        if gemv_only:  # a Python condition: decided when built
            through_scratch(gemv_all, qw, qs, x, r, y, rows)
        else:
            if rows < T.int64(panel_min):
                through_scratch(gemv_all, qw, qs, x, r, y, rows)
            else:
                if amx:
                    amx_gemm(qw, qs, x, r, y, rows)
                else:
                    through_scratch(panel_all, qw, qs, x, r, y, rows)

    return linear.kernel(body, layout, residual, (T.int64(nb), T.int64(k // 8), T.int64(BLOCK)),
                         (T.int64(nb), T.int64(groups), T.int64(BLOCK)), scale_dtype, k, n, n // 2 if silu else n)


def stock_source(n: int, k: int, layout: str, residual: bool, scale_dtype: str = "float32") -> str:
    return cpu_gemv.stock_source(n, k, layout, residual, BLOCK, scale_dtype)


def stock_kernel(n: int, k: int, layout: str, residual: bool, scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    return cpu_gemv.stock_kernel(n, k, layout, residual, BLOCK, scale_dtype)


def fused_silu_kernel(n: int, k: int, layout: str, amx: bool = False, precision: str = "f32",
                      prefetch_ahead: bool = True, scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """The gate_up layer (N = 2I rows: gate then up, I a multiple of 64) and the gated activation in one kernel:
    y [rows, I] = silu(x . gate^T) * (x . up^T), the `silu_mul_kernel` formula. On AMX (from PANEL_MIN rows) a task
    computes gate block b and up block b + I/64 and writes their product: the [rows, 2I] intermediate is never
    written or read again (at 512 rows the plain kernel spends ~1/4 of its time writing it, and the activation
    kernel reads it back). Below PANEL_MIN rows, without AMX, or where Linux refuses the AMX state: the blocked
    kernel's paths into a scratch, then the activation."""
    return blocked_kernel(n, k, layout, False, amx=amx, precision=precision, prefetch_ahead=prefetch_ahead,
                          scale_dtype=scale_dtype, silu=True)


def replace_blocked_q4_matmul(func: tvm.tirx.PrimFunc, amx: bool = False, precision: str = "f32",
                              prefetch_ahead: bool = True) -> Optional[tvm.tirx.PrimFunc]:
    """The blocked-layout kernel for a stock blocked q4f32 (dequantize + NT_matmul [+ add]) kernel, else None.
    `amx`: prefill rows on AMX tiles (`has_amx(target)`) in `precision`."""
    return cpu_gemv.replace_stock(func, BLOCK, lambda *sig, scale_dtype: blocked_kernel(
        *sig, amx=amx, precision=precision, prefetch_ahead=prefetch_ahead, scale_dtype=scale_dtype), "q4_blocked64")
