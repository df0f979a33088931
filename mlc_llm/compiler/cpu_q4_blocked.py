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
with AMX-BF16 those rows run on tiles instead (`_AMX`, x in two bfloat16 parts times the integer weights, scaled per group).

The kernels are TVMScript text, and replace only kernels structurally equal to the stock dequantize + NT_matmul
[+ residual add] of the blocked layout (`cpu_gemv.replace_stock` with block 64; the NK kernels use it with block 0).
Rows of N that are not a multiple of 64 keep the NK layout (`Quantization.blocked`) and the NK kernels.
"""
from __future__ import annotations

from typing import Optional

import tvm

from . import cpu_gemv
from .cpu import tasks as cpu_tasks
from .cpu.amx import AMX_REQUEST, bf16_parts, bf16x32, intrin, round_bf16, tile_config
from .cpu.text import indent, parse, prefetch
from .cpu_gemv import _index, _shapes, _source, scale_text

BLOCK = 64  # output rows per block (scheme.BLOCK_ROWS)
# (row tile, 16-row vectors per pass) for R == 1 and for R > 1: a tile's partial sums (t * v vectors) stay in
# registers (4 x 4 beat the other tilings tried: bench/gemv_batched.py).
PLANS = ((1, 4), (4, 4))

# Groups of 32 K-values prefetched ahead (1 KB of words + 256 B of scales each): the hardware prefetcher stops at
# 4 KB pages. Only where it pays (`prefetch_pays`).
PREFETCH_GROUPS = 4

# Prefill (R >= PANEL_MIN rows): a task dequantizes its 64-row block once into a float32 panel [K, 64] and runs a
# register-tiled GEMM on it, PANEL_TILE rows x 64 columns (24 accumulators, 4 panel loads and 6 broadcasts per
# 24 FMAs). Tasks are (block, chunk of PANEL_CHUNK rows), so the 9 blocks of N=576 still keep 2+ threads busy; each
# chunk's task dequantizes the block again (a few microseconds against ~50 us of FMAs at 48 rows).
PANEL_MIN = 16
PANEL_TILE = 6
PANEL_CHUNK = 48

# With AMX (Sapphire Rapids and later; `has_amx`), the same rows run on the tile unit instead. A weight is
# (q - 7) * scale with q - 7 an integer in -7..8, exact in bfloat16, and a tile product (`tdpbf16ps`, 16x16x32, float32
# accumulation) spans exactly one group of 32 K-values, whose 64 rows share a scale each. So per group: x, split into
# two bfloat16 parts (hi = rounded, lo = the rounded remainder: 16 significant bits), times the integer weights in
# two products x_hi.q + x_lo.q on freshly zeroed accumulator tiles, stored, and added to the float32 output sums times
# the group's scales (vector FMAs). Error: x's rounding past 16 bits (2^-17 relative) and float32 sums, against float32
# FMAs' 2^-24 per operation (splitting the dequantized weights as well takes three products and doubles the error).
# A prelude converts x once ([row tile, group, hi/lo, AMX_TILE_ROWS, 32]); tasks are (chunk of ~AMX_CHUNK_ROWS rows,
# 64-row block), run with work stealing (cpu_tasks.steal_loop): the block's integer weights are unpacked into a VNNI panel (two bf16 of
# consecutive k per 32-bit word), then for each tile of AMX_TILE_ROWS rows and each half of the block (32 columns),
# group by group: 2 accumulator tiles (tile registers 0-1; x hi/lo in 4-5, weights in 6-7), stored to a scratch
# buffer and added times the scales to the 14 x 32 output sums, which stay in 28 vector registers across the groups
# (16 x 64 tiles would need 64 registers of sums, spilled to memory every group). Linux hands out AMX state only on
# request (arch_prctl ARCH_REQ_XCOMP_PERM): the kernel asks at each call (one syscall, against >= 100 us of work) and
# runs the float32 panel GEMM if refused.
# Prefill precisions of the AMX GEMM: "f32" (above, the default: logits as with float32 FMAs) or "bf16" (one product
# of x and the dequantized w, each rounded to bfloat16 as PyTorch's bf16 matmuls do, no per-group step: faster,
# ~2e-3 relative error per GEMM). Without AMX every precision runs the float32 kernels.
PRECISIONS = ("f32", "bf16")
AMX_CHUNK_ROWS = 256  # rows of x per task: ceil(256 / tile rows) tiles
AMX_TILE_ROWS = 14  # rows per tile of the f32 kernel (the bf16 one: 16)

# One pass: `t` rows of x (tile `bo`) times `v` 16-row vectors (pass `p` of the 64-row block `blk`). At each group,
# the words and scales of the group PREFETCH_GROUPS ahead are prefetched (past the end of the block: the next block,
# which the same task or its neighbour reads next; past the end of the buffer a prefetch is only a hint, never a
# fault). 2^(-4 (rr % 8)) is built from its exponent bits, so the pre-scale vectorizes.
_PASS = """
for bi in T.unroll({t}):
    for v in T.unroll({v}):
        for l in T.vectorized(16):
            acc[bi, v * 16 + l] = T.float32(0)
for g in range(T.int64({g})):
{prefetch}    for bi in T.unroll({t}):
        for rr in T.vectorized(32):
            xs[bi, rr] = x[{xrow}, g * 32 + rr] * T.reinterpret("float32", T.shift_left(T.Cast("uint32", 127 - 4 * (rr % 8)), T.uint32(23)))
        for l in T.vectorized(16):
            xsum[bi, l] = x[{xrow}, g * 32 + l] + x[{xrow}, g * 32 + 16 + l]
        for v in T.unroll({v}):
            for l in T.vectorized(16):
                part[bi, v * 16 + l] = T.float32(0)
    for w in range(4):
        for j in T.unroll(8):
            for v in T.unroll({v}):
                for l in T.vectorized(16):
                    wv[v * 16 + l] = T.Cast("float32", T.bitwise_and(qw[blk, g * 4 + w, p * {pr} + v * 16 + l], T.shift_left(T.uint32(15), T.Cast("uint32", j * 4))))
                for bi in T.unroll({t}):
                    for l in T.vectorized(16):
                        part[bi, v * 16 + l] = part[bi, v * 16 + l] + wv[v * 16 + l] * xs[bi, w * 8 + j]
    for bi in T.unroll({t}):
        for v in T.unroll({v}):
            for l in T.vectorized(16):
                acc[bi, v * 16 + l] = acc[bi, v * 16 + l] + {scale} * (part[bi, v * 16 + l] - T.float32(7) * ({xsum}))
"""
_PANEL = """
wp = T.alloc_buffer((T.int64({k}), 64), "float32")
acc = T.alloc_buffer(({t}, 64), "float32", scope="global")
for g in range(T.int64({g})):
    for w in range(4):
        for j in T.unroll(8):
            for l in T.vectorized(64):
                wp[g * 32 + w * 8 + j, l] = (T.Cast("float32", T.bitwise_and(T.shift_right(qw[blk, g * 4 + w, l], T.Cast("uint32", j * 4)), T.uint32(15))) - T.float32(7)) * {scale}
for bo in range({tiles}):
    for bi in T.unroll({t}):
        for l in T.vectorized(64):
            acc[bi, l] = T.float32(0)
    for kk in range(T.int64({k})):
        for bi in T.unroll({t}):
            for v in T.unroll(4):
                for l in T.vectorized(16):
                    acc[bi, v * 16 + l] = acc[bi, v * 16 + l] + x[{xrow}, kk] * wp[kk, v * 16 + l]
    for bi in range({t}):
        if {out} < {rows}:
            for i in range(64):
                y[{yidx}] = {res}acc[bi, i]
"""
# The upper 16 bits of a float32's bits: its bfloat16 (truncated)
_AMX = AMX_REQUEST + """if perm[0] == T.int64(0):
    xa = T.alloc_buffer(({mtiles}, {g}, {parts}, {tr}, 32), "uint16")
    for mt in T.parallel({mtiles}):
        for g in range({g}):
            for mi in range({tr}):
{x_convert}
{tasks}
else:
{panel}
"""
# One task of the AMX GEMM (run by cpu_tasks.steal_loop; the setup once per thread): block `blk`, chunk `c` of row
# tiles
_AMX_SETUP = """
{tile_config}
wh = T.alloc_buffer(({sides}, {g}, 4, 16, 16), "uint32")
{scratch}
"""
_AMX_TASK = """
blk = T.bind(task % T.int64({nb}))
c = T.bind(task // T.int64({nb}))
for side in range({sides}):
    for g in range({g}):
        for k2 in range(16):
            for ct in T.unroll(4):
                for l in T.vectorized(16):
{w_convert}
for mt in range(c * T.int64({cht}), T.min((c + 1) * T.int64({cht}), {mtiles})):
{groups}
"""


def _amx_gemm(n: int, k: int, layout: str, residual: bool, panel: str, precision: str = "f32",
              silu: bool = False, scale_dtype: str = "float32") -> str:
    """The AMX GEMM for R >= PANEL_MIN rows (`panel`: the float32 panel GEMM, run when AMX is refused). `precision`
    "f32": two products per group on the integer weights (x_hi.q + x_lo.q), times the group's scales in float32, in
    tiles of AMX_TILE_ROWS rows; "bf16": one product of x and w rounded to bfloat16, in tiles of 16 rows. `silu`:
    y = silu(gate) * up for the gate_up layer (`fused_silu_kernel`): a task computes gate block blk and up block
    blk + N/128 (its two sides) and writes the product as output block blk."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown prefill precision '{precision}' (allowed: {', '.join(PRECISIONS)})")
    f32 = precision == "f32"
    tr = AMX_TILE_ROWS if f32 else 16
    rows = _shapes(layout)[2]
    g = k // 32
    nb, sides = (n // BLOCK // 2, 2) if silu else (n // BLOCK, 1)
    wblk = f"blk + side * T.int64({nb})" if silu else "blk"  # the weight block of a side
    row = f"T.min(mt * {tr} + mi, {rows} - T.int64(1))"  # rows past R read the last one
    xr = f"x[{_index(layout, row, 'g * 32 + l')}]"
    q = [f'(T.Cast("float32", T.bitwise_and(T.shift_right(qw[{wblk}, g * 4 + k2 // 4, ct * 16 + l], '
         f'T.Cast("uint32", (k2 % 4) * 8 + {4 * j})), T.uint32(15))) - T.float32(7))' for j in (0, 1)]
    xv = lambda c: f"x[{_index(layout, row, f'T.ramp(g * 32 + {c}, 1, 16)')}]"  # noqa: E731
    x_convert = [f"xa[mt, g, 0, mi, T.ramp(0, 1, 32)] = {bf16x32(xv(0), xv(16))}"]
    yidx = _index(layout, f"mt * {tr} + mi", "blk * 64 + nn")
    res = _res_plus(residual, layout, f"mt * {tr} + mi", "blk * 64 + nn")
    if f32:
        # a 32-bit word of the VNNI panel: q - 7 of k (low half) and k + 1 (high half), integers in -7..8, which
        # bfloat16 holds exactly: the upper halves of their float32 bits
        w_convert = (f'wh[side, g, ct, k2, l] = T.shift_right(T.reinterpret("uint32", {q[0]}), T.uint32(16)) + '
                     f'T.reinterpret("uint32", {q[1]})')
        # x_lo: what x_hi leaves, rounded
        x_convert = (['xl = T.alloc_buffer((32,), "float32")', "for l in T.vectorized(32):",
                      f'    xl[l] = {xr} - T.reinterpret("float32", {round_bf16(xr)})']
                     + x_convert + [f"xa[mt, g, 1, mi, T.ramp(0, 1, 32)] = "
                                    f"{bf16x32('xl[T.ramp(0, 1, 16)]', 'xl[T.ramp(16, 1, 16)]')}"])
        # per half h of the block (32 columns) and group: accumulator tiles 0-1, x hi/lo 4-5, weights 6-7; the
        # products stored to cg, then added times the group's scales to acc0/acc1 (tr x 16 each: vector registers)

        def group(first: bool, side: int) -> list[str]:
            lines = [intrin("tilezero", f"T.int8({t})") for t in range(2)]
            lines += [intrin("tileloadd64", f"T.int8({4 + p})", f"T.address_of(xa[mt, g, {p}, 0, 0])", "T.int64(64)")
                      for p in range(2)]
            lines += [intrin("tileloadd64", f"T.int8({6 + t})", f"T.address_of(wh[{side}, g, h * 2 + {t}, 0, 0])",
                             "T.int64(64)") for t in range(2)]
            lines += [intrin("tdpbf16ps", f"T.int8({t})", f"T.int8({4 + p})", f"T.int8({6 + t})")
                      for p in range(2) for t in range(2)]
            lines += [intrin("tilestored64", f"T.int8({t})", f"T.address_of(cg[0, {16 * t}])", "T.int64(128)")
                      for t in range(2)]
            lines += [f"for mi in T.unroll({tr}):", "    for l in T.vectorized(16):"]
            qb = f"blk + T.int64({nb})" if side else "blk"
            lines += [f"        acc{t}[mi, l] = {'' if first else f'acc{t}[mi, l] + '}"
                      f"{scale_text(f'qs[{qb}, g, h * 32 + {16 * t} + l]', scale_dtype)} * cg[mi, {16 * t} + l]"
                      for t in range(2)]
            return indent("\n".join(lines), 1).rstrip("\n").split("\n")

        def sums(side: int) -> list[str]:  # the first group sets acc (no zeroing pass)
            return ["for g in range(1):", *group(True, side), f"for g in range(1, {g}):", *group(False, side)]
        cols = ["blk * 64 + h * 32 + l", "blk * 64 + h * 32 + 16 + l"]
        out = [f"acc{t}[mi, l]" for t in range(2)]
        body = sums(0)
        if silu:  # the gate's sums kept in gb0/gb1 while the up side runs
            body += [f"for mi in T.unroll({tr}):", "    for l in T.vectorized(16):"]
            body += [f"        gb{t}[mi, l] = acc{t}[mi, l]" for t in range(2)] + sums(1)
            out = [f"silu_mul(gb{t}[mi, l], acc{t}[mi, l])" for t in range(2)]
        write = [f"for mi in T.unroll({tr}):", f"    if mt * {tr} + mi < {rows}:", "        for l in T.vectorized(16):"]
        write += [f"            y[{yidx.replace('blk * 64 + nn', c)}] = {res.replace('blk * 64 + nn', c)}{out[t]}"
                  for t, c in enumerate(cols)]
        groups = ["for h in range(2):", *indent("\n".join(body + write), 1).rstrip("\n").split("\n")]
        # acc0/acc1: two buffers of 1 KB or less, which TVM puts on the stack (a larger one goes to its workspace,
        # where LLVM cannot keep it in registers)
        scratch = "\n".join([f'cg = T.alloc_buffer(({tr}, 32), "float32")'] +
                            [f'{b}{t} = T.alloc_buffer(({tr}, 16), "float32")'
                             for b in (("acc", "gb") if silu else ("acc",)) for t in range(2)])
        cfg = tile_config((tr,) * 6 + (16, 16))
    else:
        w = [f"{v} * {scale_text(f'qs[{wblk}, g, ct * 16 + l]', scale_dtype)}" for v in q]
        w_convert = f"wh[side, g, ct, k2, l] = {bf16_parts(w[0], w[1])[0]}"

        def sums(side: int, buf: str) -> list[str]:
            step = [intrin("tileloadd64", "T.int8(4)", "T.address_of(xa[mt, g, 0, 0, 0])", "T.int64(64)")]
            for ct in range(4):  # tile ids are immediates: one statement per column tile
                step.append(intrin("tileloadd64", "T.int8(6)", f"T.address_of(wh[{side}, g, {ct}, 0, 0])",
                                   "T.int64(64)"))
                step.append(intrin("tdpbf16ps", f"T.int8({ct})", "T.int8(4)", "T.int8(6)"))
            return ([intrin("tilezero", f"T.int8({t})") for t in range(4)] + [f"for g in range({g}):"]
                    + indent("\n".join(step), 1).rstrip("\n").split("\n")
                    + [intrin("tilestored64", f"T.int8({t})", f"T.address_of({buf}[0, {16 * t}])", "T.int64(256)")
                       for t in range(4)])
        out = f"{res}cb[mi, nn]"
        groups = sums(0, "cb")
        if silu:
            groups = sums(0, "gb") + sums(1, "cb")
            out = "silu_mul(gb[mi, nn], cb[mi, nn])"
        groups += ["for mi in range(16):", f"    if mt * 16 + mi < {rows}:", "        for nn in range(64):",
                   f"            y[{yidx}] = {out}"]
        scratch = 'cb = T.alloc_buffer((16, 64), "float32")' + ('\ngb = T.alloc_buffer((16, 64), "float32")'
                                                               if silu else "")
        cfg = tile_config()
    mtiles = f"(({rows} + T.int64({tr - 1})) // T.int64({tr}))"
    cht = -(-AMX_CHUNK_ROWS // tr)
    chunks = f"(({mtiles} + T.int64({cht - 1})) // T.int64({cht}))"
    task = _AMX_TASK.format(nb=nb, g=g, sides=sides, w_convert=indent(w_convert, 5), cht=cht, mtiles=mtiles,
                            groups=indent("\n".join(groups), 1))
    setup = _AMX_SETUP.format(tile_config=cfg, g=g, sides=sides, scratch=scratch)
    tasks = cpu_tasks.steal_loop(f"T.int64({nb}) * {chunks}", task, setup, intrin("tilerelease"))
    return _AMX.format(
        mtiles=mtiles, g=g, parts=2 if f32 else 1, tr=tr, x_convert=indent("\n".join(x_convert), 4),
        tasks=indent(tasks, 1), panel=indent(panel, 1))


_WRITE = """
for i in range({pr}):
    y[{yidx}] = {res}acc[bi, i]
"""


def stock_source(n: int, k: int, layout: str, residual: bool, scale_dtype: str = "float32") -> str:
    return cpu_gemv.stock_source(n, k, layout, residual, BLOCK, scale_dtype)


def stock_kernel(n: int, k: int, layout: str, residual: bool, scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    return cpu_gemv.stock_kernel(n, k, layout, residual, BLOCK, scale_dtype)


def _res_plus(residual, layout: str, row: str, col: str) -> str:
    """The epilogue's addend followed by " + " (or "" without one)."""
    res = cpu_gemv.res_ref(residual, layout, row, col)
    return res + " + " if res else ""


def prefetch_pays(target: tvm.target.Target) -> bool:
    """Whether the decode GEMVs prefetch the groups ahead in software: it paid on the Intel VMs and made decode slower
    on AMD Zen 4 (docs/BENCHMARKS.md)."""
    return not str(target.attrs.get("mcpu", "")).startswith("znver")


def _plan(n: int, k: int, layout: str, residual: bool, t: int, v: int, prefetch_ahead: bool = True,
          scale_dtype: str = "float32") -> str:
    """Buffers and loops for row tiles of `t` rows, 16*v output rows per pass."""
    rows = _shapes(layout)[2]
    pr = 16 * v
    row = f"T.min(bo * {t} + bi, {rows} - T.int64(1))" if t > 1 else "T.int64(0)"
    out = f"bo * {t} + bi" if t > 1 else "T.int64(0)"
    col = f"blk * {BLOCK} + p * {pr} + i"
    qw_ahead = prefetch(f"qw[blk, g * 4 + {4 * PREFETCH_GROUPS} + c // 4, (c % 4) * 16]")
    qs_ahead = prefetch(f"qs[blk, g + {PREFETCH_GROUPS}, c * 16]")
    ahead = f"for c in T.unroll(16):\n    {qw_ahead}\nfor c in T.unroll(4):\n    {qs_ahead}"
    body = _PASS.format(
        t=t, v=v, pr=pr, g=k // 32, prefetch=indent(ahead, 1) if prefetch_ahead else "",
        scale=scale_text(f"qs[blk, g, p * {pr} + v * 16 + l]", scale_dtype),
        xrow=_index(layout, row, "0").rsplit(",", 1)[0], xsum=" + ".join(f"xsum[bi, {i}]" for i in range(16)),
    )
    write = _WRITE.format(pr=pr, yidx=_index(layout, out, col), res=_res_plus(residual, layout, out, col))
    if t > 1:  # rows of the last tile past R were computed on clamped rows: not written
        write = f"if bo * {t} + bi < {rows}:\n" + indent(write, 1)
    body += f"for bi in range({t}):\n" + indent(write, 1)
    head = (f"acc = T.alloc_buffer(({t}, {pr}), \"float32\", scope=\"global\")\n"
            f"part = T.alloc_buffer(({t}, {pr}), \"float32\", scope=\"global\")\n"
            f"wv = T.alloc_buffer(({pr},), \"float32\", scope=\"global\")\n"
            f"xs = T.alloc_buffer(({t}, 32), \"float32\", scope=\"global\")\n"
            f"xsum = T.alloc_buffer(({t}, 16), \"float32\", scope=\"global\")\n")
    loops = f"for bo in range(({rows} + T.int64({t - 1})) // T.int64({t})):\n" if t > 1 else "for bo in range(1):\n"
    loops += f"    for p in range({BLOCK // pr}):\n"
    return head + loops + indent(body, 2)


def _panel(n: int, k: int, layout: str, residual: bool, t: int = PANEL_TILE, chunk: int = PANEL_CHUNK,
           scale_dtype: str = "float32") -> str:
    """Rows [ch * chunk, min(R, (ch + 1) * chunk)) of block `blk`: dequantize the block into a panel, then tiles of
    `t` rows (the last tile's rows past R clamped on read, skipped on write)."""
    rows = _shapes(layout)[2]
    first = f"ch * T.int64({chunk}) + bo * {t}"
    row, out, col = f"T.min({first} + bi, {rows} - T.int64(1))", f"{first} + bi", "blk * 64 + i"
    tiles = f"T.min(T.int64({chunk // t}), ({rows} - ch * T.int64({chunk}) + T.int64({t - 1})) // T.int64({t}))"
    return _PANEL.format(k=k, g=k // 32, t=t, tiles=tiles, rows=rows, out=out,
                         scale=scale_text("qs[blk, g, l]", scale_dtype),
                         xrow=_index(layout, row, "0").rsplit(",", 1)[0], yidx=_index(layout, out, col),
                         res=_res_plus(residual, layout, out, col))


def blocked_source(n: int, k: int, layout: str, residual: bool, plans=PLANS, panel_min: int = PANEL_MIN,
                   amx: bool = False, precision: str = "f32", silu: bool = False, prefetch_ahead: bool = True,
                   scale_dtype: str = "float32") -> str:
    """Below `panel_min` rows: one parallel task per 64-row block; inside it a branch on the row count R: one row
    (plans[0]), then R <= t of each middle plan, then the last plan. From `panel_min` rows: the panel GEMM, parallel
    over (chunk of PANEL_CHUNK rows, block). Two parallel nests under one branch: bound inside one parallel loop
    (task = chunk * blocks + block) the decode paths were slower (bench/gemv_batched.py).
    `panel_min=0`: no panel GEMM (the last plan for any R: the kernel before the panel, for comparisons). `amx`: from
    `panel_min` rows the AMX GEMM in `precision` (PRECISIONS), with the panel GEMM as its fallback. `silu`: see
    `fused_silu_kernel`. `prefetch_ahead`: software prefetch in the GEMV paths (`prefetch_pays`). `scale_dtype`: of
    the weights' scales (float32 or float16)."""
    rows = _shapes(layout)[2]
    nb = n // BLOCK
    if silu:
        if residual or n % (2 * BLOCK):
            raise ValueError(f"gate_up + silu needs no residual and N a multiple of {2 * BLOCK} (N = {n})")
        scratch, act = _silu_parts(n, layout)

    def into_scratch(code: str) -> str:  # (silu) a path writing gu instead of y, then the activation
        return scratch + code.replace("y[", "gu[").rstrip("\n") + "\n" + act
    if layout == "11":
        code = f"for blk in T.parallel(T.int64({nb})):\n" + indent(_plan(n, k, layout, residual, *plans[0],
                                                                          prefetch_ahead, scale_dtype), 1)
        if silu:
            code = into_scratch(code)
        return _silu_header(_source(indent(code, 1), n, k, layout, residual, BLOCK, scale_dtype), n, layout, silu)
    branches = [("==", "T.int64(1)", _plan(n, k, layout, residual, *plans[0], prefetch_ahead, scale_dtype))]
    branches += [("<=", f"T.int64({t})", _plan(n, k, layout, residual, t, v, prefetch_ahead, scale_dtype))
                 for t, v in plans[1:-1]]
    code, level = "", 2
    for op, bound, nest in branches:
        code += indent(f"if {rows} {op} {bound}:", level) + indent(nest, level + 1)
        code += indent("else:", level)
        level += 1
    code += indent(_plan(n, k, layout, residual, *plans[-1], prefetch_ahead, scale_dtype), level)
    small = cpu_tasks.steal_parallel(f"for blk in T.parallel(T.int64({nb})):\n" + code, var="blk", name="_gemv")
    if silu:
        small = into_scratch(small)
    if not panel_min:
        return _silu_header(_source(indent(small, 1), n, k, layout, residual, BLOCK, scale_dtype), n, layout, silu)
    chunks = f"(({rows} + T.int64({PANEL_CHUNK - 1})) // T.int64({PANEL_CHUNK}))"
    panel = (f"for task in T.parallel(T.int64({nb}) * {chunks}):\n"
             f"    blk = T.bind(task % T.int64({nb}))\n    ch = T.bind(task // T.int64({nb}))\n"
             + indent(_panel(n, k, layout, residual, scale_dtype=scale_dtype), 1))
    if silu:
        panel = into_scratch(panel)
    if amx:
        panel = _amx_gemm(n, k, layout, residual, panel, precision, silu, scale_dtype)
    code = f"if {rows} < T.int64({panel_min}):\n" + indent(small, 1) + "else:\n" + indent(panel, 1)
    return _silu_header(_source(indent(code, 1), n, k, layout, residual, BLOCK, scale_dtype), n, layout, silu)


def _silu_parts(n: int, layout: str) -> tuple[str, str]:
    """For the fused kernel's paths without the AMX epilogue: the gate_up scratch `gu` [rows, n] they write instead
    of y, and the loop y = silu(gate) * up over it (parallel over rows, as the `silu_mul_kernel` it replaces)."""
    _, xs, rows = _shapes(layout)
    half = n // 2
    at = lambda col: _index(layout, "r", col)  # noqa: E731
    scratch = f'gu = T.alloc_buffer(({xs}, T.int64({n})), "float32")\n'
    gate, up = f"gu[{at('cc * 16 + l')}]", f"gu[{at(f'T.int64({half}) + cc * 16 + l')}]"
    act = (f"for r in T.parallel({rows}):\n    for cc in range({half // 16}):\n        for l in T.vectorized(16):\n"
           f"            y[{at('cc * 16 + l')}] = silu_mul({gate}, {up})\n")
    return scratch, act


def _silu_header(src: str, n: int, layout: str, silu: bool) -> str:
    """The fused kernel's y has N/2 columns."""
    if not silu:
        return src
    xs = _shapes(layout)[1]
    old = f'y = T.match_buffer(y_h, ({xs}, T.int64({n})), "float32")'
    assert old in src
    return src.replace(old, f'y = T.match_buffer(y_h, ({xs}, T.int64({n // 2})), "float32")')


def blocked_kernel(n: int, k: int, layout: str, residual: bool, plans=PLANS, panel_min: int = PANEL_MIN,
                   amx: bool = False, precision: str = "f32", prefetch_ahead: bool = True,
                   scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    return parse(blocked_source(n, k, layout, residual, plans, panel_min, amx, precision,
                                prefetch_ahead=prefetch_ahead, scale_dtype=scale_dtype))


def fused_silu_kernel(n: int, k: int, layout: str, amx: bool = False, precision: str = "f32",
                      prefetch_ahead: bool = True, scale_dtype: str = "float32") -> tvm.tirx.PrimFunc:
    """The gate_up layer (N = 2I rows: gate then up, I a multiple of 64) and the gated activation in one kernel:
    y [rows, I] = silu(x . gate^T) * (x . up^T), the `silu_mul_kernel` formula. On AMX (from PANEL_MIN rows) a task
    computes gate block b and up block b + I/64 and writes their product: the [rows, 2I] intermediate is never
    written or read again (at 512 rows the plain kernel spends ~1/4 of its time writing it, and the activation
    kernel reads it back). Below PANEL_MIN rows, without AMX, or where Linux refuses the AMX state: the blocked
    kernel's paths into a scratch, then the activation."""
    return parse(blocked_source(n, k, layout, False, amx=amx, precision=precision, silu=True,
                                prefetch_ahead=prefetch_ahead, scale_dtype=scale_dtype))


def replace_blocked_q4_matmul(func: tvm.tirx.PrimFunc, amx: bool = False, precision: str = "f32",
                              prefetch_ahead: bool = True) -> Optional[tvm.tirx.PrimFunc]:
    """The blocked-layout kernel for a stock blocked q4f32 (dequantize + NT_matmul [+ add]) kernel, else None.
    `amx`: prefill rows on AMX tiles (`has_amx(target)`) in `precision`."""
    return cpu_gemv.replace_stock(func, BLOCK, lambda *sig, scale_dtype: blocked_kernel(
        *sig, amx=amx, precision=precision, prefetch_ahead=prefetch_ahead, scale_dtype=scale_dtype), "q4_blocked64")
