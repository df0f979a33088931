"""The project's CPU attention kernels: decode over the paged KV cache (replaces TVM's `tir_attention_decode_cpu`),
prefill of new tokens against themselves (`tir_attention_prefill_ragged_cpu`) and against the KV pages their
sequences already hold (`tir_attention_prefill_cpu`: the second and later chunks of a prompt longer than
prefill_chunk_size), and RoPE + q/k/v split (`tir_split_rotary`).

TVM's CPU decode kernel is serial over sequences, heads and KV rows, with scalar loops over head_dim and three `exp2`
library calls per row and head, and its cost grows with the context. This kernel
- runs (sequence, KV head) pairs in parallel; the query heads that share a KV head (GQA) are done together, so each
  K/V row is read once for all of them;
- works a page (16 rows) at a time: scores of the page (dot products vectorized over head_dim; each K row read once
  for the query heads of its KV head), the page's max and sum as vector halving trees, one rescale of the output per
  page and head (online softmax per page, not per row), weights by a vectorized polynomial `exp2` (relative error
  < 2e-7; TVM lowers `T.exp2` to a libm call per lane), then the weighted V rows (each read once for those heads);
- keeps the stock kernel's inputs and outputs exactly: same parameters, the output normalized by the softmax sum, and
  `lse` = max + log2(sum) in the log2 domain (scores scaled by sm_scale * log2(e)), used when the runtime merges
  attention states; a sequence with no KV gives 0 and lse -5e4 as the stock kernel does.
It assumes RoPE is applied before the cache (`RopeMode.NORMAL`, what our models use: the stock kernel's
`rotary_mode == 1` branch is not implemented) and no sliding window (the sliding-window kernel stays stock).
The ragged prefill kernel works tiles of 16 query tokens x one KV head with one query token per vector lane: scores
are FMAs of a query vector and a broadcast K element, the online softmax is vertical (no horizontal sums), and the
output accumulates in 8 independent FMA chains; on CPUs with AMX-BF16 it runs on tiles instead (`_PREFILL_AMX`:
operands in two bfloat16 parts, outputs within ~2e-5 of float64). The paged prefill kernel is the same code with each
16-row chunk a KV page: TVM's is serial and scalar and walks every row of the cache's page capacity for each query
token and head. Measurements: docs/BENCHMARKS.md ("Measurements that were comments"). `cpu_kernels.replace_attention`
swaps them into the module being built, under the stock functions' names and symbols.
"""
from __future__ import annotations

from typing import Callable

import tvm
from tvm.script import tirx as T

from .cpu import tasks as cpu_tasks
from .cpu.amx import AMX_REQUEST, intrin
from .cpu.tasks import SERIAL_ROWS
from .cpu.text import indent, parse, prefetch
from .cpu.vecmath import LOG2E, halve

PAGE = 16
# Decode tasks aimed at: a batch of B sequences splits each (sequence, KV head)'s pages among
# min(ceil(SPLIT_TASKS / (B * KV heads)), pages per sequence / SPLIT_MIN_PAGES) tasks (bench/attention.py).
SPLIT_TASKS = 16
SPLIT_MIN_PAGES = 8

# One page of one task: the scores of every row for the task's query heads (each K row read once, the heads'
# dot products independent), then per head the page max/sum (vector halving) and the rescale, then the weighted V rows
# (each V row read once for all heads).
_CHUNK = """
for r in range({page}):
    for g in T.unroll({grp}):
        if r < rows:
{score}
        else:
            s[g, r] = T.float32(-1e30)
for g in range({grp}):
{page_max}
    st[1] = T.max(m[g], st[0])
    st[2] = exp2(m[g] - st[1])
    for r in T.vectorized({page}):
        s[g, r] = exp2(s[g, r] - st[1])
{page_sum}
    den[g] = den[g] * st[2] + st[3]
    m[g] = st[1]
    for dd in T.vectorized({d}):
        o[g, dd] = o[g, dd] * st[2]
for r in range(rows):
    for g in T.unroll({grp}):
        for dd in T.vectorized({d}):
            o[g, dd] = o[g, dd] + s[g, r] * T.Cast("float32", {v_row})
"""

# Per task: the query heads of one KV head (pre-scaled to the log2 domain), their outputs and softmax state.
_STATE = """
q = T.alloc_buffer(({grp}, {d}), "float32", scope="global")
o = T.alloc_buffer(({grp}, {d}), "float32", scope="global")
s = T.alloc_buffer(({grp}, {page}), "float32", scope="global")
part = T.alloc_buffer(({d},), "float32", scope="global")
m = T.alloc_buffer(({grp},), "float32", scope="global")
den = T.alloc_buffer(({grp},), "float32", scope="global")
st = T.alloc_buffer((4,), "float32", scope="global")  # chunk max, new max, rescale factor, chunk sum
for g in range({grp}):
    for dd in T.vectorized({d}):
        q[g, dd] = T.Cast("float32", {q_row}) * (sm_scale * T.float32({log2e}))
        o[g, dd] = T.float32(0)
    m[g] = T.float32(-50000)
    den[g] = T.float32(0)
"""

# Decode's state starts with sum 0 (so that splits merge); no KV at all gives 0 and lse -5e4.
_WRITE_DECODE = """
for g in range({grp}):
    if den[g] > T.float32(0):
        for dd in T.vectorized({d}):
            {out_row} = T.Cast("{dtype}", o[g, dd] / den[g])
        {lse} = m[g] + T.log2(den[g])
    else:
        for dd in T.vectorized({d}):
            {out_row} = T.Cast("{dtype}", T.float32(0))
        {lse} = T.float32(-50000)
"""

# Decode. With few (sequence, KV head) pairs and long contexts (one sequence of SmolLM2: 3 KV heads, so 3 tasks on
# 2 threads left one idle a third of the time), the pages of each pair are split among `ns` tasks: each leaves its
# unnormalized output, max and sum in a workspace, and a second parallel loop merges the splits. ns = 1 (no workspace,
# no merge) unless the batch has fewer than SPLIT_TASKS pairs and at least SPLIT_MIN_PAGES pages per sequence on
# average. A sequence (or split) without KV has sum 0: the result is 0 with lse -5e4, as in the stock kernel.
_DECODE = """
@T.prim_func(s_tir=True)
def main(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
         page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
         q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
         rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
    T.func_attr({{"tirx.is_scheduled": True, "tirx.noalias": True}})
    B = T.int32()
    nnz_pages = T.int32()
    max_num_pages = T.int32()
    page_indptr_elem_offset = T.int32()
    page_values_elem_offset = T.int32()
    k_rope_pos_offset_elem_offset = T.int32()
    q_rope_position_elem_offset = T.int32()
    length_info_elem_offset = T.int32()
    Q = T.match_buffer(Q_handle, (B, {hq}, {d}), "{dtype}")
    pages = T.match_buffer(pages_handle, (max_num_pages, 2, {hkv}, {page}, {d}), "{dtype}")
    page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
    page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
    k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
    q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)
    output = T.match_buffer(output_handle, (B, {hq}, {d}), "{dtype}")
    lse = T.match_buffer(lse_handle, (B, {hq}), "float32")
    length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)
    ns = T.bind({ns})
    if ns == 1:
        for task in T.parallel(B * {hkv}):
            b = T.bind(task // {hkv})
            hk = T.bind(task % {hkv})
            begin = T.bind(page_table_indptr[b])
            n_pages = T.bind(page_table_indptr[b + 1] - begin)
{state}            for p in range(n_pages):
                page_no = T.bind(page_table_values[begin + p])
                rows = T.bind(T.if_then_else(p == n_pages - 1, length_info[b], {page}))
{prefetch}{chunk}{write}
    else:
        # B * hkv * ns <= B * hkv + split_tasks - 1 (ns <= ceil(split_tasks / (B * hkv)))
        part_o = T.alloc_buffer((B * {hkv} + {split_tasks}, {grp}, {d}), "float32")
        part_md = T.alloc_buffer((B * {hkv} + {split_tasks}, {grp}, 2), "float32")
        for task in T.parallel(B * {hkv} * ns):
            b = T.bind(task // ({hkv} * ns))
            hk = T.bind(task // ns % {hkv})
            sp = T.bind(task % ns)
            begin = T.bind(page_table_indptr[b])
            n_pages = T.bind(page_table_indptr[b + 1] - begin)
{state}            for p in range(sp * n_pages // ns, (sp + 1) * n_pages // ns):
                page_no = T.bind(page_table_values[begin + p])
                rows = T.bind(T.if_then_else(p == n_pages - 1, length_info[b], {page}))
{prefetch}{chunk}            for g in range({grp}):
                for dd in T.vectorized({d}):
                    part_o[task, g, dd] = o[g, dd]
                part_md[task, g, 0] = m[g]
                part_md[task, g, 1] = den[g]
        for bh in T.parallel(B * {hkv}):
            b = T.bind(bh // {hkv})
            hk = T.bind(bh % {hkv})
            o = T.alloc_buffer(({grp}, {d}), "float32", scope="global")
            m = T.alloc_buffer(({grp},), "float32", scope="global")
            den = T.alloc_buffer(({grp},), "float32", scope="global")
            w = T.alloc_buffer((1,), "float32", scope="global")
            for g in range({grp}):
                m[g] = T.float32(-50000)
                for sp in range(ns):
                    m[g] = T.max(m[g], part_md[bh * ns + sp, g, 0])
                den[g] = T.float32(0)
                for dd in T.vectorized({d}):
                    o[g, dd] = T.float32(0)
                for sp in range(ns):
                    w[0] = exp2(part_md[bh * ns + sp, g, 0] - m[g])
                    den[g] = den[g] + part_md[bh * ns + sp, g, 1] * w[0]
                    for dd in T.vectorized({d}):
                        o[g, dd] = o[g, dd] + part_o[bh * ns + sp, g, dd] * w[0]
{write}"""

# The prefill kernels' parameters: TVM's ragged (q, k, v of the new tokens) and paged (q, the KV pages) signatures,
# then the buffers both have (_PREFILL_BUFFERS) and those of each.
_RAGGED_SIG = """
@T.prim_func(s_tir=True)
def main(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
         var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
         causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
"""
_PAGED_SIG = """
@T.prim_func(s_tir=True)
def main(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
         var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
         var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
         rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
"""
_PREFILL_BUFFERS = """
    T.func_attr({{"tirx.noalias": True}})
    batch_size = T.int32()
    qo_len = T.int32()
    q_indptr_elem_offset = T.int32()
    q_rope_position_elem_offset = T.int32()
    k_rope_pos_offset_elem_offset = T.int32()
    Qb = T.match_buffer(var_q, (qo_len, {hq}, {d}), "{dtype}")
    q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
    q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)
    k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)
    output = T.match_buffer(var_output, (qo_len, {hq}, {d}), "{dtype}")
    lse = T.match_buffer(var_lse, (qo_len, {hq}), "float32")
"""
_RAGGED_BUFFERS = """
    kv_len = T.int32()
    kv_indptr_elem_offset = T.int32()
    Kb = T.match_buffer(var_k, (kv_len, {hkv}, {d}), "{dtype}")
    Vb = T.match_buffer(var_v, (kv_len, {hkv}, {d}), "{dtype}")
    kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
"""
_PAGED_BUFFERS = """
    nnz_pages = T.int32()
    max_num_pages = T.int32()
    page_indptr_elem_offset = T.int32()
    page_values_elem_offset = T.int32()
    length_info_elem_offset = T.int32()
    pages = T.match_buffer(var_pages, (max_num_pages, 2, {hkv}, {page}, {d}), "{dtype}")
    page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
    page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
    length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
"""
# Prefill of new tokens (the body shared by the ragged kernel, KV = the new tokens' own k and v, and the paged kernel,
# KV = the pages a sequence holds); with `causal`, token i of a sequence sees KV rows up to kv_len - qo_len + i. One
# task per (tile of 16 query tokens of one sequence, KV head), and a vector lane per query token: the tile's queries
# are transposed once ([head, d, 16 tokens]), so that for each 16-row chunk of K and V (copied once per chunk, clamped
# rows past the sequence's end masked)
# - the scores of one query head are 16 vectors (one per KV row, lanes = tokens), each FMA a q vector times a
#   broadcast K element: no horizontal sums;
# - the online softmax is vertical: the max and the sum over the chunk's rows are trees of vector max/add, and every
#   token's rescale factor is one lane of a vector;
# - the output [head, d, 16 tokens] is accumulated 8 d-rows at a time (8 independent FMA chains, P in registers).
# Tiles are numbered over the sequences (a prelude counts them) and handed out first, last, second, second to last,
# ...: each thread first runs its own contiguous range of them (TVM's split), and with `causal` a later tile has more
# rows to read; then it takes the tasks left in the other threads' ranges (work stealing, cpu_tasks.steal_loop).
_TASKS = """
    n_tiles = T.alloc_buffer((1,), "int32", scope="global")
    n_tiles[0] = 0
    for bb in range(batch_size):
        n_tiles[0] = n_tiles[0] + (q_indptr[bb + 1] - q_indptr[bb] + {qt_m1}) // {qt}
    for task in T.parallel(n_tiles[0] * {hkv}):
        pos = T.bind(task // {hkv})
        hk = T.bind(task % {hkv})
        tile = T.bind(T.if_then_else(pos % 2 == 0, pos // 2, n_tiles[0] - 1 - pos // 2))
        loc = T.alloc_buffer((3,), "int32", scope="global")  # the tile's sequence, its first tile, tiles so far
        loc[0] = 0
        loc[1] = 0
        loc[2] = 0
        for bb in range(batch_size):
            nt = T.bind((q_indptr[bb + 1] - q_indptr[bb] + {qt_m1}) // {qt})
            if loc[2] <= tile and tile < loc[2] + nt:
                loc[0] = bb
                loc[1] = loc[2]
            loc[2] = loc[2] + nt
        b = T.bind(loc[0])
        q_n = T.bind(q_indptr[b + 1] - q_indptr[b])
        t0 = T.bind((tile - loc[1]) * {qt})
        nq = T.bind(T.min({qt}, q_n - t0))
{kv_setup}        kv_hi = T.bind(T.if_then_else(causal > 0, T.min(kv_n, kv_n - q_n + t0 + nq), kv_n))
"""
_PREFILL_VEC = """
        qt = T.alloc_buffer(({grp}, {d}, {qt}), "float32", scope="global")
        ot = T.alloc_buffer(({grp}, {d}, {qt}), "float32", scope="global")
        m = T.alloc_buffer(({grp}, {qt}), "float32", scope="global")
        den = T.alloc_buffer(({grp}, {qt}), "float32", scope="global")
        kc = T.alloc_buffer(({page}, {d}), "float32", scope="global")
        vc = T.alloc_buffer(({page}, {d}), "float32", scope="global")
        sc = T.alloc_buffer(({page}, {qt}), "float32", scope="global")
        p = T.alloc_buffer(({page}, {qt}), "float32", scope="global")
        acc = T.alloc_buffer((8, {qt}), "float32", scope="global")
        st = T.alloc_buffer((2, {qt}), "float32", scope="global")  # new max, rescale factor of the output
        for g in range({grp}):
            for dd in range({d}):
                for l in T.vectorized({qt}):
                    qt[g, dd, l] = T.Cast("float32", Qb[q_indptr[b] + T.min(t0 + l, q_n - 1), hk * {grp} + g, dd]) * (sm_scale * T.float32({log2e}))
                    ot[g, dd, l] = T.float32(0)
            for l in T.vectorized({qt}):
                m[g, l] = T.float32(-50000)
                den[g, l] = T.float32(1)
        for c in range((kv_hi + {page_m1}) // {page}):
            if c * {page} + {page} <= kv_n:
                for r in range({page}):
                    for dd in T.vectorized({d}):
                        kc[r, dd] = T.Cast("float32", {k_full})
                        vc[r, dd] = T.Cast("float32", {v_full})
            else:  # the last, partial chunk: rows past the sequence repeat its last row (masked)
                for r in range({page}):
                    for dd in T.vectorized({d}):
                        kc[r, dd] = T.Cast("float32", {k_part})
                        vc[r, dd] = T.Cast("float32", {v_part})
            for g in range({grp}):
                for r in T.unroll({page}):
                    for l in T.vectorized({qt}):
                        sc[r, l] = qt[g, 0, l] * kc[r, 0]
                for dd in range(1, {d}):
                    for r in T.unroll({page}):
                        for l in T.vectorized({qt}):
                            sc[r, l] = sc[r, l] + qt[g, dd, l] * kc[r, dd]
{softmax}                for d8 in range({d} // 8):
                    for j in T.unroll(8):
                        for l in T.vectorized({qt}):
                            acc[j, l] = ot[g, d8 * 8 + j, l] * st[1, l]
                    for r in T.unroll({page}):
                        for j in T.unroll(8):
                            for l in T.vectorized({qt}):
                                acc[j, l] = acc[j, l] + p[r, l] * vc[r, d8 * 8 + j]
                    for j in T.unroll(8):
                        for l in T.vectorized({qt}):
                            ot[g, d8 * 8 + j, l] = acc[j, l]
{write}"""
# The online softmax of one chunk of `rows` KV rows for query head g: the scores sc[r, l] (rows past what token l may
# see masked), the new max and the output's rescale factor (st), the weights p[r, l], the sum and max.
_SOFTMAX = """
for r in T.unroll({rows}):
    for l in T.vectorized({qt}):
        sc[r, l] = T.Select(r < {lim}, sc[r, l], T.float32(-1e30))
for l in T.vectorized({qt}):
    st[0, l] = T.max(m[g, l], {cmax})
    st[1, l] = exp2(m[g, l] - st[0, l])
for r in T.unroll({rows}):
    for l in T.vectorized({qt}):
        p[r, l] = T.Select(r < {lim}, exp2(sc[r, l] - st[0, l]), T.float32(0))
for l in T.vectorized({qt}):
    den[g, l] = den[g, l] * st[1, l] + {psum}
    m[g, l] = st[0, l]
"""
_WRITE_PREFILL = """
for g in range({grp}):
    for l in range(nq):
        for dd in range({d}):
            output[q_indptr[b] + t0 + l, hk * {grp} + g, dd] = T.Cast("{dtype}", ot[g, dd, l] / den[g, l])
        lse[q_indptr[b] + t0 + l, hk * {grp} + g] = m[g, l] + T.log2(den[g, l])
"""

# The ragged prefill kernel on AMX tiles (CPUs with AMX-BF16, `cpu.amx.has_amx`). Every float32 operand is
# split into two bfloat16 parts (hi = rounded, lo = the rounded remainder: 16 significant bits) and a product of two
# split operands is three tile products, hi.hi + hi.lo + lo.hi (float32 accumulation; lo.lo, ~2^-18 of it, is left
# out). A prelude converts K and V once for all tasks: K rows as they are (kx: the A operand of the scores), V
# transposed (vx: rows = head_dim, the A operand of the output), both padded past the last row. Per task (16 query
# tokens x one KV head) the query heads' q, pre-scaled, is converted once into the B operand layout (qx: pairs of
# consecutive d of a token in one 32-bit word), and per chunk of AMX_CHUNK KV rows and query head:
# - scores transposed, S^T = K . q^T: two 16-row tiles stored as sc[row, token], the vector kernel's layout, so the
#   online softmax is the same vertical code;
# - the weights p[row, token] converted to B operand words (two consecutive rows of a token per word, hi and lo);
# - the output transposed, O^T = V^T . P^T, into head_dim / 16 tiles stored as ob[d, token], added to the rescaled
#   output accumulator ot[d, token] (the vector kernel's layout; the same final write).
# Tile registers: scores 0-1, outputs 0-3 (head_dim 64 at a time), q or p hi/lo 4-5, K or V^T hi/lo 6-7.
_AMX_PRELUDE = """
    kx = T.alloc_buffer(({hkv}, 2, {rows_pad}, {d}), "uint16")
    vx = T.alloc_buffer(({hkv}, 2, {d}, {rows_pad}), "uint16")
    if kv_len > 0:
        for row in T.parallel({rows_pad}):
            for hk in range({hkv}):
                for dd in T.vectorized({d}):
                    kx[hk, 0, row, dd] = {k_hi}
                    kx[hk, 1, row, dd] = {k_lo}
        for hd in T.parallel({hkv} * {d}):
            for rc in range({rows_pad} // 16):
                for l in T.vectorized(16):
                    vx[hd // {d}, 0, hd % {d}, rc * 16 + l] = {v_hi}
                    vx[hd // {d}, 1, hd % {d}, rc * 16 + l] = {v_lo}
"""
_PREFILL_AMX = """
{tile_config}
        qx = T.alloc_buffer(({grp}, 2, {d} // 32, 16, {qt}), "uint32")
        ot = T.alloc_buffer(({grp}, {d}, {qt}), "float32")
        m = T.alloc_buffer(({grp}, {qt}), "float32", scope="global")
        den = T.alloc_buffer(({grp}, {qt}), "float32", scope="global")
        sc = T.alloc_buffer(({ch}, {qt}), "float32")
        p = T.alloc_buffer(({ch}, {qt}), "float32")
        pb = T.alloc_buffer((2, {ch} // 2, {qt}), "uint32")
        ob = T.alloc_buffer(({d}, {qt}), "float32")
        st = T.alloc_buffer((2, {qt}), "float32", scope="global")  # new max, rescale factor of the output
        for g in range({grp}):
            for dp in range({d} // 2):
                for l in T.vectorized({qt}):
                    qx[g, 0, dp // 16, dp % 16, l] = {q_hi}
                    qx[g, 1, dp // 16, dp % 16, l] = {q_lo}
            for dd in range({d}):
                for l in T.vectorized({qt}):
                    ot[g, dd, l] = T.float32(0)
            for l in T.vectorized({qt}):
                m[g, l] = T.float32(-50000)
                den[g, l] = T.float32(1)
        for c in range((kv_hi + {ch_m1}) // {ch}):
            for g in range({grp}):
{scores}
{softmax}
                for i in range({ch} // 2):
                    for l in T.vectorized({qt}):
                        pb[0, i, l] = {p_hi}
                        pb[1, i, l] = {p_lo}
{pv}
{write}
        {tilerelease}
"""
# KV rows per chunk of the AMX kernel: one tile product's K for the output (32 rows of P^T)
AMX_CHUNK = 32
# The AMX kernel runs from this many new KV rows per sequence (on average over the batch): below, its conversions
# and half-masked 32-row chunks cost more than it saves (bench/attention.py).
AMX_MIN_ROWS = 192

# Query tokens per task of the ragged prefill kernel: one per lane of a float32 vector.
QTILE = 16


def _score(d: int, k_row: str) -> str:
    """s[g, r] = q[g] . k_row as TIR text (`dd` in k_row is the head_dim index). With d % 16 == 0: 16-lane products
    summed in a register, then halved 16 -> 8 -> 4 -> 2 -> 1 (vectorlow/vectorhigh: 4 extract + add steps; summing
    through a buffer reloads halves just after a full-vector store, which fails store forwarding). Otherwise a
    balanced scalar tree."""
    if d % 16 == 0:
        ramp = lambda c: f"T.ramp({16 * c}, 1, 16)"  # noqa: E731
        prods = [f"q[g, {ramp(c)}] * T.Cast(\"float32x16\", {k_row.replace('dd', ramp(c))})" for c in range(d // 16)]
        return "\n".join(halve(" + ".join(prods), "+", "v", out="s[g, r]"))
    terms = [f"part[{i}]" for i in range(d)]
    while len(terms) > 1:  # TVM does not reassociate a serial sum into vector adds
        terms = [f"({terms[i]} + {terms[i + len(terms) // 2]})" for i in range(len(terms) // 2)] + \
            (terms[-1:] if len(terms) % 2 else [])
    return (f"for dd in T.vectorized({d}):\n    part[dd] = q[g, dd] * T.Cast(\"float32\", {k_row})\n"
            f"s[g, r] = {terms[0]}")


def _sliding(text: str, old: str, new: str, count: int = 1) -> str:
    assert text.count(old) == count, old
    return text.replace(old, new)


# Windowed layers (TVM's "mha_sliding"): length_info is [3, B] — the last page's rows, the offset of the first row in
# use (the window starts inside the first page), the attention-sink rows (kept at the front; 0 in our engine). The
# pages in use hold physical rows [0, sink) and [offset, P); the rows between are masked.
_SLIDING_ROWS = "pr < length_info[2, b] or pr >= length_info[1, b]"


def decode_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str,
                  sliding: bool = False) -> tvm.tirx.PrimFunc:
    """Same parameters as TVM's `_attention_decode_cpu`: `_DECODE` with the per-task state, the page loop body
    (`_CHUNK`) and the output write. `sliding`: the windowed layers' variant (`_SLIDING_ROWS`)."""
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    grp = hq // hkv
    common = dict(hq=hq, hkv=hkv, d=d, dtype=dtype, page=PAGE, grp=grp, log2e=repr(LOG2E), split_tasks=SPLIT_TASKS,
                  ns=f"T.max(1, T.min(({SPLIT_TASKS} + B * {hkv} - 1) // (B * {hkv}), "
                     f"(page_table_indptr[B] - page_table_indptr[0]) // (B * {SPLIT_MIN_PAGES})))")
    state = indent(_STATE.format(q_row=f"Q[b, hk * {grp} + g, dd]", **common), 3)
    chunk = indent(_CHUNK.format(v_row="pages[page_no, 1, hk, r, dd]",
                                 score=indent(_score(d, "pages[page_no, 0, hk, r, dd]"), 3),
                                 page_max=indent("\n".join(halve(f"s[g, T.ramp(0, 1, {PAGE})]", "max", "pm",
                                                                  out="st[0]")), 1),
                                 page_sum=indent("\n".join(halve(f"s[g, T.ramp(0, 1, {PAGE})]", "+", "ps",
                                                                  out="st[3]")), 1),
                                 **common), 4)
    write = indent(_WRITE_DECODE.format(out_row=f"output[b, hk * {grp} + g, dd]", lse=f"lse[b, hk * {grp} + g]",
                                        **common), 3)
    # the K rows of the next page and the V rows of this one (a page's rows of one head are one 4 KB run, where the
    # hardware prefetcher stops)
    per_line = 64 // tvm.DataType(dtype).bits * 8
    lines = PAGE * d // per_line
    at = lambda page_no, kv: f"pages[{page_no}, {kv}, hk, c * {per_line} // {d}, c * {per_line} % {d}]"  # noqa: E731
    pages_ahead = indent(f"if p + 1 < n_pages:\n    for c in T.unroll({lines}):\n"
                         f"        {prefetch(at('page_table_values[begin + p + 1]', 0))}\n"
                         f"for c in T.unroll({lines}):\n    {prefetch(at('page_no', 1))}", 4)
    text = _DECODE.format(state=state, chunk=chunk, write=write, prefetch=pages_ahead, **common)
    if sliding:
        text = _sliding(text, "(var_length_info, (B,),", "(var_length_info, (3, B),")
        text = _sliding(text, "rows = T.bind(T.if_then_else(p == n_pages - 1, length_info[b], 16))",
                        "rows = T.bind(T.if_then_else(p == n_pages - 1, length_info[0, b], 16))", 2)
        pr = f"p * {PAGE} + r"
        text = _sliding(text, "if r < rows:", f"if r < rows and ({_SLIDING_ROWS.replace('pr', pr)}):", 2)
    # tasks of both branches: at most B * hkv + SPLIT_TASKS - 1 (see _DECODE)
    return parse(cpu_tasks.steal_parallel(text, name="_dec", dtype="int32", capacity=f"B * {hkv} + {SPLIT_TASKS}"))


def _tree(terms: list[str], comb) -> str:
    """`terms` combined pairwise as a balanced tree (independent operations, not one serial chain)."""
    while len(terms) > 1:
        terms = [comb(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)] + terms[len(terms) // 2 * 2:]
    return terms[0]


def _softmax_text(rows: int) -> str:
    """`_SOFTMAX` for chunks of `rows` KV rows (chunk c, lane l = query token t0 + l)."""
    lim = f"T.min(kv_n, T.Select(causal > 0, kv_n - q_n + t0 + l + 1, kv_n)) - c * {rows}"
    return _SOFTMAX.format(rows=rows, qt=QTILE, lim=lim,
                           cmax=_tree([f"sc[{r}, l]" for r in range(rows)], lambda x, y: f"T.max({x}, {y})"),
                           psum=_tree([f"p[{r}, l]" for r in range(rows)], lambda x, y: f"({x} + {y})"))


def _amx_text(d: int, grp: int) -> dict:
    """The AMX kernel's prelude and per-chunk tile code (see _PREFILL_AMX)."""
    rows_pad = f"((kv_len + {AMX_CHUNK + 15}) // 16 * 16)"
    row0 = f"kv_start + c * {AMX_CHUNK}"
    qel = lambda dd: (f'T.Cast("float32", Qb[q_indptr[b] + T.min(t0 + l, q_n - 1), hk * {grp} + g, {dd}]) '  # noqa
                      f'* (sm_scale * T.float32({LOG2E!r}))')
    load = lambda t, addr, stride: intrin("tileloadd64", f"T.int8({t})", f"T.address_of({addr})", stride)  # noqa: E731
    dp = lambda c, a, b: intrin("tdpbf16ps", f"T.int8({c})", f"T.int8({a})", f"T.int8({b})")  # noqa: E731
    scores = [intrin("tilezero", "T.int8(0)"), intrin("tilezero", "T.int8(1)"), f"for dh in range({d // 32}):"]
    step = [load(4, "qx[g, 0, dh, 0, 0]", "T.int64(64)"), load(5, "qx[g, 1, dh, 0, 0]", "T.int64(64)")]
    for rt in range(2):  # S^T rows rt*16.. += K hi/lo . q hi/lo
        step += [load(6 + part, f"kx[hk, {part}, {row0} + {16 * rt}, dh * 32]", f"T.int64({2 * d})")
                 for part in range(2)]
        step += [dp(rt, 6, 4), dp(rt, 6, 5), dp(rt, 7, 4)]
    scores += ["    " + line for line in step]
    scores += [intrin("tilestored64", f"T.int8({rt})", f"T.address_of(sc[{16 * rt}, 0])", "T.int64(64)")
               for rt in range(2)]
    pv = [load(4, "pb[0, 0, 0]", "T.int64(64)"), load(5, "pb[1, 0, 0]", "T.int64(64)")]
    vstride = f"T.Cast(\"int64\", {rows_pad}) * T.int64(2)"
    for base in range(0, d // 16, 4):  # O^T rows (head_dim) 64 at a time, tiles 0-3
        pv += [intrin("tilezero", f"T.int8({t})") for t in range(4)]
        for t in range(4):
            pv += [load(6 + part, f"vx[hk, {part}, {16 * (base + t)}, {row0}]", vstride) for part in range(2)]
            pv += [dp(t, 6, 4), dp(t, 6, 5), dp(t, 7, 4)]
        pv += [intrin("tilestored64", f"T.int8({t})", f"T.address_of(ob[{16 * (base + t)}, 0])", "T.int64(64)")
               for t in range(4)]
    pv += [f"for dd in range({d}):", f"    for l in T.vectorized({QTILE}):",
           "        ot[g, dd, l] = ot[g, dd, l] * st[1, l] + ob[dd, l]"]
    def parts(args: str) -> tuple[str, str]:  # the hi and lo parts (`amx.bf16_parts`), called by name
        return f"bf16_parts({args})[0]", f"bf16_parts({args})[1]"
    k_hi, k_lo = parts("Kb[T.min(row, kv_len - 1), hk, dd]")
    v_hi, v_lo = parts(f"Vb[T.min(rc * 16 + l, kv_len - 1), hd // {d}, hd % {d}]")
    q_hi, q_lo = parts(f'{qel("dp * 2")}, {qel("dp * 2 + 1")}')
    p_hi, p_lo = parts("p[i * 2, l], p[i * 2 + 1, l], tiny=True")
    return dict(rows_pad=rows_pad, k_hi=k_hi, k_lo=k_lo, v_hi=v_hi, v_lo=v_lo, q_hi=q_hi, q_lo=q_lo, p_hi=p_hi,
                p_lo=p_lo, ch=AMX_CHUNK, ch_m1=AMX_CHUNK - 1, tile_config=indent("tile_config()", 2),
                tilerelease=intrin("tilerelease"), scores=indent("\n".join(scores), 4), pv=indent("\n".join(pv), 4),
                softmax=indent(_softmax_text(AMX_CHUNK), 4))


def _prefill(sig: str, buffers: str, kv_setup: str, k_row: Callable[[str], str], v_row: Callable[[str], str], num_q_heads: int,
             num_kv_heads: int, head_dim: int, dtype: str, amx: bool = False, amx_min_rows: int = AMX_MIN_ROWS) -> str:
    """`_TASKS` + `_PREFILL_VEC` under the signature `sig` with its own `buffers`; `kv_setup` binds kv_n (the
    sequence's KV rows); `k_row(row)` / `v_row(row)`: TIR text of the K / V element (head hk, column dd) at row `row`
    of chunk c (0 <= row < 16). `amx` (the ragged kernel only): `_AMX_PRELUDE` + `_TASKS` + `_PREFILL_AMX` from
    `amx_min_rows` new KV rows per sequence, with the vector kernel below that and where Linux refuses the AMX state."""
    assert head_dim % 8 == 0
    grp = num_q_heads // num_kv_heads
    last = f"T.min(r, kv_n - 1 - c * {PAGE})"  # the partial last chunk: rows past the end repeat its last row
    common = dict(hq=num_q_heads, hkv=num_kv_heads, d=head_dim, dtype=dtype, grp=grp, qt=QTILE, qt_m1=QTILE - 1,
                  kv_setup=indent(kv_setup, 2),
                  write=indent(_WRITE_PREFILL.format(grp=grp, d=head_dim, dtype=dtype), 2))
    vec = (_TASKS + _PREFILL_VEC).format(
        page=PAGE, page_m1=PAGE - 1, log2e=repr(LOG2E), k_full=k_row("r"), v_full=v_row("r"), k_part=k_row(last),
        v_part=v_row(last), softmax=indent(_softmax_text(PAGE), 4), **common)
    cap = f"((qo_len + {QTILE - 1}) // {QTILE} + batch_size) * {num_kv_heads}"  # >= the tasks (tiles x KV heads)
    vec = cpu_tasks.steal_parallel(vec, name="_vec", dtype="int32", capacity=cap)
    head = (sig + _PREFILL_BUFFERS + buffers).format(page=PAGE, **common)
    if not amx:
        return head + vec
    text = _amx_text(head_dim, grp)
    fast = cpu_tasks.steal_parallel((_AMX_PRELUDE + _TASKS + _PREFILL_AMX).format(**text, **common), name="_amx",
                                    dtype="int32", capacity=cap)
    branch = f"    if perm[0] == T.int64(0) and kv_len >= {amx_min_rows} * batch_size:\n"
    return head + indent(AMX_REQUEST, 1) + branch + indent(fast, 1) + "    else:\n" + indent(vec, 1)


def ragged_prefill_source(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, amx: bool = False,
                          amx_min_rows: int = AMX_MIN_ROWS) -> str:
    """TVMScript of `ragged_prefill_kernel`."""
    return _prefill(_RAGGED_SIG, _RAGGED_BUFFERS,
                    "kv_start = T.bind(kv_indptr[b])\nkv_n = T.bind(kv_indptr[b + 1] - kv_start)",
                    lambda row: f"Kb[kv_start + c * {PAGE} + {row}, hk, dd]",
                    lambda row: f"Vb[kv_start + c * {PAGE} + {row}, hk, dd]", num_q_heads, num_kv_heads, head_dim,
                    dtype, amx and head_dim % 64 == 0 and dtype == "float32", amx_min_rows)


def ragged_prefill_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, amx: bool = False,
                          amx_min_rows: int = AMX_MIN_ROWS) -> tvm.tirx.PrimFunc:
    """Same parameters as TVM's `_attention_prefill_ragged_cpu` (new tokens against themselves). head_dim must be a
    multiple of 8 (`install` keeps TVM's kernel otherwise). A sequence with no KV gives 0 and lse -5e4, as the stock
    kernel does. `amx`: on AMX tiles (`_PREFILL_AMX`; float32 with head_dim a multiple of 64, else the vector
    kernel) from `amx_min_rows` new KV rows per sequence on average."""
    return parse(ragged_prefill_source(num_q_heads, num_kv_heads, head_dim, dtype, amx, amx_min_rows))


def paged_prefill_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str,
                         window: int = 0) -> tvm.tirx.PrimFunc:
    """Same parameters as TVM's `_attention_prefill_cpu` (new tokens against a sequence's KV pages: the KV rows are
    the pages' rows, the last page holding length_info[b]); the ragged kernel's tiles with each 16-row chunk a page.
    Assumes RoPE applied before the cache (rotary_mode 0), as the decode kernel. `window` > 0: the windowed layers'
    variant (TVM's with sliding_window_size = window): rows outside `_SLIDING_ROWS` masked and, with `causal`, query
    token i of the chunk sees only the last max(window - i - 1, 0) rows of the history (the rest of its window is
    among the new tokens: the ragged kernel's part)."""
    info = "length_info[0, b]" if window else "length_info[b]"
    setup = (f"pg0 = T.bind(page_indptr[b])\nnpg = T.bind(page_indptr[b + 1] - pg0)\n"
             f"kv_n = T.bind(T.if_then_else(npg > 0, (npg - 1) * {PAGE} + {info}, 0))")
    text = _prefill(_PAGED_SIG, _PAGED_BUFFERS, setup, lambda row: f"pages[page_values[pg0 + c], 0, hk, {row}, dd]",
                    lambda row: f"pages[page_values[pg0 + c], 1, hk, {row}, dd]", num_q_heads, num_kv_heads,
                    head_dim, dtype)
    if window:
        text = _sliding(text, "(var_length_info, (batch_size,),", "(var_length_info, (3, batch_size),")
        text = _sliding(text, "kv_hi = T.bind(T.if_then_else(causal > 0, T.min(kv_n, kv_n - q_n + t0 + nq), kv_n))",
                        "kv_hi = T.bind(kv_n)")
        # physical row pr of chunk c; L = the history's rows in use; token t0 + l may see rows >= kv_n - visible
        pr = f"c * {PAGE} + r"
        hist = "(kv_n - length_info[1, b] + length_info[2, b])"
        visible = f"T.Select(causal > 0, T.max({window} - (t0 + l) - 1, 0), {hist})"
        ok = (f"({_SLIDING_ROWS.replace('pr', pr)}) and T.Select({pr} < length_info[2, b], {pr} >= {hist} - "
              f"{visible}, {pr} >= kv_n - {visible})")
        old_lim = f"T.min(kv_n, T.Select(causal > 0, kv_n - q_n + t0 + l + 1, kv_n)) - c * {PAGE}"
        text = _sliding(text, f"r < {old_lim}", f"r < kv_n - c * {PAGE} and {ok}", 2)
    return parse(text)


# RoPE on the fused qkv of new tokens, split into q, k, v (replaces TVM's `tir_split_rotary` for the default RoPE).
# TVM's kernel is serial and evaluates pow, cos and sin for every (token, head, dim): 12 us per decode token, 1.5 ms
# for 128 prompt tokens, per layer. Here the rotary_dim / 2 powers theta^(2i / rotary_dim) are evaluated once per call,
# tokens run in parallel, and each token's angles are evaluated once (the same f32 formula: pos * scale / power), then
# applied to every q and k head.
def rope_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, theta: float, scale: float = 1.0,
                rotary_dim: int | None = None) -> tvm.tirx.PrimFunc:
    """Same parameters and results as TVM's `llama_rope_with_position_map` for the default RoPE: q, k rotated (the
    first `rotary_dim` dims; the rest copied) and v copied out of the fused qkv; a task per token."""
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    rot = rotary_dim or head_dim
    half = rot // 2
    theta, scale = float(theta), float(scale)

    @T.macro
    def store(q, k, s, h, col, value):  # q for heads < hq, else k
        if h < hq:
            q[s, h, col] = T.Cast(dtype, value)
        else:
            k[s, h - hq, col] = T.Cast(dtype, value)

    @T.macro
    def token(qkv, position_map, q, k, v, freq, s, apply_rope):
        cs = T.alloc_buffer((2, half), "float32", scope="global")
        for i in range(half):
            cs[0, i] = T.cos(T.Cast("float32", position_map[s]) * T.float32(scale) / freq[i])
            cs[1, i] = T.sin(T.Cast("float32", position_map[s]) * T.float32(scale) / freq[i])
        for h in range(hq + hkv):
            if apply_rope > 0:
                for i in T.vectorized(half):
                    store(q, k, s, h, i, cs[0, i] * T.Cast("float32", qkv[s, h, i]) +
                          cs[1, i] * -T.Cast("float32", qkv[s, h, i + half]))
                    store(q, k, s, h, i + half, cs[0, i] * T.Cast("float32", qkv[s, h, i + half]) +
                          cs[1, i] * T.Cast("float32", qkv[s, h, i]))
                if rot < d:  # dims past rotary_dim are copied (a Python condition: decided when built)
                    for i in T.vectorized(d - rot):
                        store(q, k, s, h, i + rot, T.Cast("float32", qkv[s, h, i + rot]))
            else:
                for i in T.vectorized(d):
                    store(q, k, s, h, i, T.Cast("float32", qkv[s, h, i]))
        for h in range(hkv):
            for i in T.vectorized(d):
                v[s, h, i] = qkv[s, hq + hkv + h, i]

    @T.prim_func(s_tir=True)
    def main(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle,
             apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, hq + 2 * hkv, d), dtype)
        q = T.match_buffer(var_q, (seq_len, hq, d), dtype)
        k = T.match_buffer(var_k, (seq_len, hkv, d), dtype)
        v = T.match_buffer(var_v, (seq_len, hkv, d), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        freq = T.alloc_buffer((half,), "float32", scope="global")
        for i in range(half):
            freq[i] = T.pow(T.float32(theta), T.Cast("float32", i * 2) / T.float32(rot))
        if seq_len < SERIAL_ROWS:
            for s in range(seq_len):
                token(qkv, position_map, q, k, v, freq, s, apply_rope)
        else:
            for s in T.parallel(seq_len):
                token(qkv, position_map, q, k, v, freq, s, apply_rope)

    return main


KERNELS = {"tir_attention_decode_cpu": decode_kernel, "tir_attention_prefill_ragged_cpu": ragged_prefill_kernel,
           "tir_attention_prefill_cpu": paged_prefill_kernel}
