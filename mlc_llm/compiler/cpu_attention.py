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
  < 2e-7; TVM lowers `T.exp2` to a libm call per lane), then the weighted V rows head by head (one output in
  registers at a time; the page's V rows from the L1 cache);
- keeps the stock kernel's inputs and outputs exactly: same parameters, the output normalized by the softmax sum, and
  `lse` = max + log2(sum) in the log2 domain (scores scaled by sm_scale * log2(e)), used when the runtime merges
  attention states; a sequence with no KV gives 0 and lse -5e4 as the stock kernel does.
It assumes RoPE is applied before the cache (`RopeMode.NORMAL`, what our models use: the stock kernel's
`rotary_mode == 1` branch is not implemented); windowed layers get the `sliding` / `window` variants.
The ragged prefill kernel works tiles of 16 query tokens x one KV head with one query token per vector lane: scores
are FMAs of a query vector and a broadcast K element, the online softmax is vertical (no horizontal sums), and the
output accumulates in 8 independent FMA chains; on CPUs with AMX-BF16 it runs on tiles instead (`amx_tile`:
operands in two bfloat16 parts, outputs within ~2e-5 of float64). The paged prefill kernel is the same code with each
16-row chunk a KV page: TVM's is serial and scalar and walks every row of the cache's page capacity for each query
token and head. Measurements: docs/BENCHMARKS.md ("Measurements that were comments"). `cpu_kernels.replace_attention`
swaps them into the module being built, under the stock functions' names and symbols.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from .cpu.amx import amx_op, bf16_parts, request_amx, tile_config
from .cpu.tasks import SERIAL_ROWS, steal
from .cpu.vecmath import LOG2E, cache_prefetch, exp2, halve

PAGE = 16
# Decode tasks aimed at: a batch of B sequences splits each (sequence, KV head)'s pages among
# min(ceil(SPLIT_TASKS / (B * KV heads)), pages per sequence / SPLIT_MIN_PAGES) tasks (bench/attention.py).
SPLIT_TASKS = 16
SPLIT_MIN_PAGES = 8

# KV rows per chunk of the AMX kernel: one tile product's K for the output (32 rows of P^T)
AMX_CHUNK = 32
# The AMX kernel runs from this many new KV rows per sequence (on average over the batch): below, its conversions
# and half-masked 32-row chunks cost more than it saves (bench/attention.py).
AMX_MIN_ROWS = 192

# Query tokens per task of the ragged prefill kernel: one per lane of a float32 vector.
QTILE = 16


def decode_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str,
                  sliding: bool = False) -> tvm.tirx.PrimFunc:
    """Same parameters as TVM's `_attention_decode_cpu`. One task per (sequence, KV head), or with few pairs and long
    contexts (one sequence of SmolLM2: 3 KV heads, so 3 tasks on 2 threads left one idle a third of the time) the
    pages of each pair split among `ns` tasks: each leaves its unnormalized output, max and sum in a workspace, and
    a second parallel loop merges the splits. ns = 1 (no workspace, no merge) unless the batch has fewer than
    SPLIT_TASKS pairs and at least SPLIT_MIN_PAGES pages per sequence on average. A sequence (or split) without KV
    has sum 0: the result is 0 with lse -5e4, as in the stock kernel. `sliding`: the windowed layers' variant
    (length_info [3, B]: rows between the sink and the window's offset masked)."""
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    grp = hq // hkv
    # each row of a page prefetches its share of the next page's K and V lines (a page's rows of one head are one
    # 4 KB run, where the hardware prefetcher stops; spread out, the requests overlap the page's work): `lines` cache
    # lines of `per_line` elements, `row_lines` per row
    per_line = 64 // tvm.DataType(dtype).bits * 8
    lines = PAGE * d // per_line
    row_lines = -(-lines // PAGE)

    def last_rows(length_info, b):  # rows in use in a sequence's last page
        return length_info[0, b] if sliding else length_info[b]

    def in_use(r, rows, p, length_info, b):  # row r of page p holds KV (sliding: not between the sink and the window)
        if not sliding:
            return r < rows
        row = p * PAGE + r
        return tvm.tirx.And(r < rows, tvm.tirx.Or(row < length_info[2, b], row >= length_info[1, b]))

    def dot16(q, g, pages, page_no, hk, r):  # q[g] . K row r as a float32x16 of partial sums
        total = q[g, T.ramp(0, 1, 16)] * T.Cast("float32x16", pages[page_no, 0, hk, r, T.ramp(0, 1, 16)])
        for c in range(1, d // 16):
            total = total + q[g, T.ramp(16 * c, 1, 16)] * T.Cast("float32x16",
                                                                 pages[page_no, 0, hk, r, T.ramp(16 * c, 1, 16)])
        return total

    def part_sum(part):  # part[0] + ... + part[d - 1] as a balanced tree: the first half plus the second, ...
        terms = [part[i] for i in range(d)]
        while len(terms) > 1:
            terms = [terms[i] + terms[i + len(terms) // 2] for i in range(len(terms) // 2)] + \
                (terms[-1:] if len(terms) % 2 else [])
        return terms[0]

    @T.macro
    def score(q, pages, page_no, hk, r, g, s, part):
        """s[g, r] = q[g] . K row r: 16-lane products summed in a register, then halved (head_dim a multiple of 16),
        else a balanced scalar tree (TVM does not reassociate a serial sum into vector adds)."""
        if d % 16 == 0:  # a Python condition: decided when built
            halve(dot16(q, g, pages, page_no, hk, r), "+", s, (g, r))
        else:
            for dd in T.vectorized(d):
                part[dd] = q[g, dd] * T.Cast("float32", pages[page_no, 0, hk, r, dd])
            s[g, r] = part_sum(part)

    @T.macro
    def init(Q, b, hk, sm_scale, q, o, m, den):
        """The query heads of KV head hk (pre-scaled to the log2 domain); output 0, softmax state empty."""
        for g in range(grp):
            for dd in T.vectorized(d):
                q[g, dd] = T.Cast("float32", Q[b, hk * grp + g, dd]) * (sm_scale * T.float32(LOG2E))
                o[g, dd] = T.float32(0)
            m[g] = T.float32(-50000)
            den[g] = T.float32(0)

    @T.macro
    def page(pages, page_table_values, length_info, b, hk, begin, n_pages, p, q, o, s, part, m, den, st):
        """Page p of the sequence: the scores of every row for the task's query heads (each K row read once, the
        heads' dot products independent), then per head the page max / sum and the rescale (online softmax per page),
        then the weighted V rows head by head (the page's V rows stay in the L1 cache)."""
        page_no = T.bind(page_table_values[begin + p])
        rows = T.bind(T.if_then_else(p == n_pages - 1, last_rows(length_info, b), PAGE))
        ahead = T.bind(page_table_values[begin + T.min(p + 1, n_pages - 1)])
        for r in range(PAGE):
            for c in T.unroll(row_lines):
                line = T.bind(T.min(r * row_lines + c, lines - 1))
                for kv in T.unroll(2):
                    T.evaluate(cache_prefetch(pages[ahead, kv, hk, line * per_line // d, line * per_line % d]))
            for g in T.unroll(grp):
                if in_use(r, rows, p, length_info, b):
                    score(q, pages, page_no, hk, r, g, s, part)
                else:
                    s[g, r] = T.float32(-1e30)
        for g in range(grp):
            halve(s[g, T.ramp(0, 1, PAGE)], "max", st, (0,))  # st: page max, new max, rescale factor, page sum
            st[1] = T.max(m[g], st[0])
            st[2] = exp2(m[g] - st[1])
            for r in T.vectorized(PAGE):
                s[g, r] = exp2(s[g, r] - st[1])
            halve(s[g, T.ramp(0, 1, PAGE)], "+", st, (3,))
            den[g] = den[g] * st[2] + st[3]
            m[g] = st[1]
            for dd in T.vectorized(d):
                o[g, dd] = o[g, dd] * st[2]
        for g in range(grp):  # head by head: its output stays in registers over the page's rows
            for r in range(rows):
                for dd in T.vectorized(d):
                    o[g, dd] = o[g, dd] + s[g, r] * T.Cast("float32", pages[page_no, 1, hk, r, dd])

    @T.macro
    def write(output, lse, b, hk, o, m, den):
        """The output normalized by the softmax sum, lse = max + log2(sum); no KV: 0 and -5e4."""
        for g in range(grp):
            if den[g] > T.float32(0):
                for dd in T.vectorized(d):
                    output[b, hk * grp + g, dd] = T.Cast(dtype, o[g, dd] / den[g])
                lse[b, hk * grp + g] = m[g] + T.log2(den[g])
            else:
                for dd in T.vectorized(d):
                    output[b, hk * grp + g, dd] = T.Cast(dtype, T.float32(0))
                lse[b, hk * grp + g] = T.float32(-50000)

    @T.macro
    def attend(task, Q, pages, page_table_indptr, page_table_values, length_info, output, lse, sm_scale, ns, part_o,
               part_md, split):
        """Task (sequence b, KV head hk): all the sequence's pages, written; with `split`, task (b, hk, split sp):
        its share of the pages, left unnormalized in part_o / part_md."""
        if split:  # a Python condition: decided when built
            b = T.bind(task // (hkv * ns))
            hk = T.bind(task // ns % hkv)
            sp = T.bind(task % ns)
        else:
            b = T.bind(task // hkv)
            hk = T.bind(task % hkv)
        begin = T.bind(page_table_indptr[b])
        n_pages = T.bind(page_table_indptr[b + 1] - begin)
        q = T.alloc_buffer((grp, d), "float32", scope="global")
        o = T.alloc_buffer((grp, d), "float32", scope="global")
        s = T.alloc_buffer((grp, PAGE), "float32", scope="global")
        part = T.alloc_buffer((d,), "float32", scope="global")
        m = T.alloc_buffer((grp,), "float32", scope="global")
        den = T.alloc_buffer((grp,), "float32", scope="global")
        st = T.alloc_buffer((4,), "float32", scope="global")
        init(Q, b, hk, sm_scale, q, o, m, den)
        if split:
            for p in range(sp * n_pages // ns, (sp + 1) * n_pages // ns):
                page(pages, page_table_values, length_info, b, hk, begin, n_pages, p, q, o, s, part, m, den, st)
            for g in range(grp):
                for dd in T.vectorized(d):
                    part_o[task, g, dd] = o[g, dd]
                part_md[task, g, 0] = m[g]
                part_md[task, g, 1] = den[g]
        else:
            for p in range(n_pages):
                page(pages, page_table_values, length_info, b, hk, begin, n_pages, p, q, o, s, part, m, den, st)
            write(output, lse, b, hk, o, m, den)

    @T.macro
    def merge(output, lse, B, ns, part_o, part_md):
        """Per (sequence, KV head): the splits' outputs rescaled to their common max and summed."""
        for bh in T.parallel(B * hkv):
            b = T.bind(bh // hkv)
            hk = T.bind(bh % hkv)
            o = T.alloc_buffer((grp, d), "float32", scope="global")
            m = T.alloc_buffer((grp,), "float32", scope="global")
            den = T.alloc_buffer((grp,), "float32", scope="global")
            w = T.alloc_buffer((1,), "float32", scope="global")
            for g in range(grp):
                m[g] = T.float32(-50000)
                for sp in range(ns):
                    m[g] = T.max(m[g], part_md[bh * ns + sp, g, 0])
                den[g] = T.float32(0)
                for dd in T.vectorized(d):
                    o[g, dd] = T.float32(0)
                for sp in range(ns):
                    w[0] = exp2(part_md[bh * ns + sp, g, 0] - m[g])
                    den[g] = den[g] + part_md[bh * ns + sp, g, 1] * w[0]
                    for dd in T.vectorized(d):
                        o[g, dd] = o[g, dd] + part_o[bh * ns + sp, g, dd] * w[0]
            write(output, lse, b, hk, o, m, den)

    def info_shape(B):
        return (3, B) if sliding else (B,)

    @T.prim_func(s_tir=True)
    def main(Q_handle: T.handle, pages_handle: T.handle, page_table_indptr_handle: T.handle,
             page_table_values_handle: T.handle, var_length_info: T.handle, k_rope_pos_offset_handle: T.handle,
             q_rope_position_handle: T.handle, output_handle: T.handle, lse_handle: T.handle, rotary_mode: T.int32,
             rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, hq, d), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, hkv, PAGE, d), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32",
                                           elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32",
                                           elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        output = T.match_buffer(output_handle, (B, hq, d), dtype)
        lse = T.match_buffer(lse_handle, (B, hq), "float32")
        length_info = T.match_buffer(var_length_info, info_shape(B), "int32", elem_offset=length_info_elem_offset)
        ns = T.bind(T.max(1, T.min((SPLIT_TASKS + B * hkv - 1) // (B * hkv),
                                   (page_table_indptr[B] - page_table_indptr[0]) // (B * SPLIT_MIN_PAGES))))
        if ns == 1:
            steal(B * hkv, attend, (Q, pages, page_table_indptr, page_table_values, length_info, output, lse, sm_scale,
                                    ns, None, None, False), dtype="int32", capacity=B * hkv + SPLIT_TASKS)
        else:
            # tasks: B * hkv * ns <= B * hkv + SPLIT_TASKS - 1 (ns <= ceil(SPLIT_TASKS / (B * hkv)))
            part_o = T.alloc_buffer((B * hkv + SPLIT_TASKS, grp, d), "float32")
            part_md = T.alloc_buffer((B * hkv + SPLIT_TASKS, grp, 2), "float32")
            steal(B * hkv * ns, attend, (Q, pages, page_table_indptr, page_table_values, length_info, output, lse,
                                         sm_scale, ns, part_o, part_md, True), dtype="int32",
                  capacity=B * hkv + SPLIT_TASKS)
            merge(output, lse, B, ns, part_o, part_md)

    return main


def _prefill_kernel(paged: bool, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, amx: bool = False,
                    amx_min_rows: int = AMX_MIN_ROWS, window: int = 0) -> tvm.tirx.PrimFunc:
    """The ragged kernel (KV = the new tokens' own k and v) or the paged one (KV = the pages a sequence holds); with
    `causal`, token i of a sequence sees KV rows up to kv_len - qo_len + i. One task per (tile of QTILE query tokens,
    KV head), a vector lane per token: scores are FMAs of a query vector and a broadcast K element and the online
    softmax is vertical, so no horizontal sums. `amx` (ragged only): on AMX tiles from `amx_min_rows` new KV rows per
    sequence on average, the vector kernel below that and where Linux refuses the AMX state. `window` (paged only):
    the windowed layers' masks."""
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    assert d % 8 == 0
    grp = hq // hkv
    windowed, amx = window > 0, bool(amx)

    def kv_row(src, first, c, row, hk, dd, kv):
        """Element dd of KV head hk, row `row` of chunk c (a page when paged) of K (kv 0) or V (kv 1); `src` is
        (K, V) of the new tokens from row `first`, or (pages, page_values) from the sequence's page `first`."""
        if paged:
            return src[0][src[1][first + c], kv, hk, row, dd]
        return src[kv][first + c * PAGE + row, hk, dd]

    def q_scaled(Qb, q_indptr, b, t0, l, q_n, hk, g, dd, sm_scale):  # token t0 + l (clamped), head hk * grp + g
        return T.Cast("float32", Qb[q_indptr[b] + T.min(t0 + l, q_n - 1), hk * grp + g, dd]) * \
            (sm_scale * T.float32(LOG2E))

    def tree(terms, comb):  # `terms` combined pairwise as a balanced tree (independent operations)
        while len(terms) > 1:
            terms = [comb(terms[i], terms[i + 1]) for i in range(0, len(terms) - 1, 2)] + terms[len(terms) // 2 * 2:]
        return terms[0]

    def rows_max(sc, l, rows):
        return tree([sc[r, l] for r in range(rows)], T.max)

    def rows_sum(p, l, rows):
        return tree([p[r, l] for r in range(rows)], lambda x, y: x + y)

    def last_rows(info, b):  # rows in use in a sequence's last page (paged)
        return info[0, b] if windowed else info[b]

    def history(info, b, kv_n):  # the history's rows in use (paged, with a window)
        return kv_n - info[1, b] + info[2, b]

    def visible(info, b, kv_n, causal, t0, l):  # token t0 + l sees the history's last `visible` rows (with a window)
        return T.Select(causal > 0, T.max(window - (t0 + l) - 1, 0), history(info, b, kv_n))

    def seen(r, l, c, rows, kv_n, q_n, t0, causal, info, b):
        """Whether token t0 + l sees KV row r of chunk c (of `rows` rows): up to its causal limit; with a window, a
        row in use (the sink, or from the window's offset on) and among the token's visible history rows."""
        if not windowed:
            return r < T.min(kv_n, T.Select(causal > 0, kv_n - q_n + t0 + l + 1, kv_n)) - c * rows
        row = c * PAGE + r
        in_use = tvm.tirx.Or(row < info[2, b], row >= info[1, b])
        recent = T.Select(row < info[2, b], row >= history(info, b, kv_n) - visible(info, b, kv_n, causal, t0, l),
                          row >= kv_n - visible(info, b, kv_n, causal, t0, l))
        return tvm.tirx.And(tvm.tirx.And(r < kv_n - c * PAGE, in_use), recent)

    @T.macro
    def softmax(sc, p, m, den, st, g, c, rows, kv_n, q_n, t0, causal, info, b):
        """The online softmax of chunk c (`rows` KV rows) for query head g: scores sc[r, l] (rows that token t0 + l
        may not see masked: past its causal limit, or outside its window and the sink), the new max and the output's
        rescale factor (st), the weights p[r, l], the sum and the max."""
        for r in T.unroll(rows):
            for l in T.vectorized(QTILE):
                sc[r, l] = T.Select(seen(r, l, c, rows, kv_n, q_n, t0, causal, info, b), sc[r, l], T.float32(-1e30))
        for l in T.vectorized(QTILE):
            st[0, l] = T.max(m[g, l], rows_max(sc, l, rows))
            st[1, l] = exp2(m[g, l] - st[0, l])
        for r in T.unroll(rows):
            for l in T.vectorized(QTILE):
                p[r, l] = T.Select(seen(r, l, c, rows, kv_n, q_n, t0, causal, info, b), exp2(sc[r, l] - st[0, l]),
                                   T.float32(0))
        for l in T.vectorized(QTILE):
            den[g, l] = den[g, l] * st[1, l] + rows_sum(p, l, rows)
            m[g, l] = st[0, l]

    @T.macro
    def write(output, lse, q_indptr, b, hk, t0, nq, ot, m, den):
        for g in range(grp):
            for l in range(nq):
                for dd in range(d):
                    output[q_indptr[b] + t0 + l, hk * grp + g, dd] = T.Cast(dtype, ot[g, dd, l] / den[g, l])
                lse[q_indptr[b] + t0 + l, hk * grp + g] = m[g, l] + T.log2(den[g, l])

    @T.macro
    def vector_tile(Qb, output, lse, q_indptr, causal, sm_scale, src, info, b, hk, q_n, t0, nq, first, kv_n, kv_hi):
        """The tile's queries transposed ([head, d, 16 tokens]); per 16-row chunk of K and V (copied once; rows past
        the sequence's end repeat its last row, masked) and query head: the scores as 16 vectors (lanes = tokens),
        each FMA a q vector times a broadcast K element; the vertical online softmax; the output [head, d, tokens]
        accumulated 8 d-rows at a time (8 independent FMA chains)."""
        qt = T.alloc_buffer((grp, d, QTILE), "float32", scope="global")
        ot = T.alloc_buffer((grp, d, QTILE), "float32", scope="global")
        m = T.alloc_buffer((grp, QTILE), "float32", scope="global")
        den = T.alloc_buffer((grp, QTILE), "float32", scope="global")
        kc = T.alloc_buffer((PAGE, d), "float32", scope="global")
        vc = T.alloc_buffer((PAGE, d), "float32", scope="global")
        sc = T.alloc_buffer((PAGE, QTILE), "float32", scope="global")
        p = T.alloc_buffer((PAGE, QTILE), "float32", scope="global")
        acc = T.alloc_buffer((8, QTILE), "float32", scope="global")
        st = T.alloc_buffer((2, QTILE), "float32", scope="global")  # new max, rescale factor of the output
        for g in range(grp):
            for dd in range(d):
                for l in T.vectorized(QTILE):
                    qt[g, dd, l] = q_scaled(Qb, q_indptr, b, t0, l, q_n, hk, g, dd, sm_scale)
                    ot[g, dd, l] = T.float32(0)
            for l in T.vectorized(QTILE):
                m[g, l] = T.float32(-50000)
                den[g, l] = T.float32(1)
        for c in range((kv_hi + (PAGE - 1)) // PAGE):
            if c * PAGE + PAGE <= kv_n:
                for r in range(PAGE):
                    for dd in T.vectorized(d):
                        kc[r, dd] = T.Cast("float32", kv_row(src, first, c, r, hk, dd, 0))
                        vc[r, dd] = T.Cast("float32", kv_row(src, first, c, r, hk, dd, 1))
            else:  # the last, partial chunk: rows past the sequence repeat its last row (masked)
                for r in range(PAGE):
                    for dd in T.vectorized(d):
                        kc[r, dd] = T.Cast("float32", kv_row(src, first, c, T.min(r, kv_n - 1 - c * PAGE), hk, dd, 0))
                        vc[r, dd] = T.Cast("float32", kv_row(src, first, c, T.min(r, kv_n - 1 - c * PAGE), hk, dd, 1))
            for g in range(grp):
                for r in T.unroll(PAGE):
                    for l in T.vectorized(QTILE):
                        sc[r, l] = qt[g, 0, l] * kc[r, 0]
                for dd in range(1, d):
                    for r in T.unroll(PAGE):
                        for l in T.vectorized(QTILE):
                            sc[r, l] = sc[r, l] + qt[g, dd, l] * kc[r, dd]
                softmax(sc, p, m, den, st, g, c, PAGE, kv_n, q_n, t0, causal, info, b)
                for d8 in range(d // 8):
                    for j in T.unroll(8):
                        for l in T.vectorized(QTILE):
                            acc[j, l] = ot[g, d8 * 8 + j, l] * st[1, l]
                    for r in T.unroll(PAGE):
                        for j in T.unroll(8):
                            for l in T.vectorized(QTILE):
                                acc[j, l] = acc[j, l] + p[r, l] * vc[r, d8 * 8 + j]
                    for j in T.unroll(8):
                        for l in T.vectorized(QTILE):
                            ot[g, d8 * 8 + j, l] = acc[j, l]
        write(output, lse, q_indptr, b, hk, t0, nq, ot, m, den)

    # --- on AMX tiles: float32 operands in two bfloat16 parts, a product as three tile products (hi.hi + hi.lo +
    # lo.hi; lo.lo, ~2^-18 of it, left out). Tiles: scores 0-1, outputs 0-3, q or p hi/lo 4-5, K or V^T hi/lo 6-7.
    def rows_pad(kv_len):  # K and V rows converted: padded past the last row to whole chunks
        return (kv_len + (AMX_CHUNK + 15)) // 16 * 16

    @T.macro
    def score_tiles(qx, kx, sc, g, hk, row0):
        """S^T = K . q^T over the chunk's 32 rows: two 16-row tiles (hi.hi + hi.lo + lo.hi), stored as sc[row, token]
        (the vector kernel's layout: the same softmax)."""
        T.evaluate(amx_op("tilezero", T.int8(0)))
        T.evaluate(amx_op("tilezero", T.int8(1)))
        for dh in range(d // 32):
            T.evaluate(amx_op("tileloadd64", T.int8(4), T.address_of(qx[g, 0, dh, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tileloadd64", T.int8(5), T.address_of(qx[g, 1, dh, 0, 0]), T.int64(64)))
            T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(kx[hk, 0, row0, dh * 32]), T.int64(2 * d)))
            T.evaluate(amx_op("tileloadd64", T.int8(7), T.address_of(kx[hk, 1, row0, dh * 32]), T.int64(2 * d)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(0), T.int8(6), T.int8(4)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(0), T.int8(6), T.int8(5)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(0), T.int8(7), T.int8(4)))
            T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(kx[hk, 0, row0 + 16, dh * 32]), T.int64(2 * d)))
            T.evaluate(amx_op("tileloadd64", T.int8(7), T.address_of(kx[hk, 1, row0 + 16, dh * 32]), T.int64(2 * d)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(1), T.int8(6), T.int8(4)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(1), T.int8(6), T.int8(5)))
            T.evaluate(amx_op("tdpbf16ps", T.int8(1), T.int8(7), T.int8(4)))
        T.evaluate(amx_op("tilestored64", T.int8(0), T.address_of(sc[0, 0]), T.int64(64)))
        T.evaluate(amx_op("tilestored64", T.int8(1), T.address_of(sc[16, 0]), T.int64(64)))

    @T.macro
    def output_tile(vx, hk, row0, vstride, dt):
        """O^T rows 16 * dt .. 16 * dt + 15 (head_dim) on tile dt % 4: V^T hi/lo . P^T hi/lo."""
        T.evaluate(amx_op("tileloadd64", T.int8(6), T.address_of(vx[hk, 0, 16 * dt, row0]), vstride))
        T.evaluate(amx_op("tileloadd64", T.int8(7), T.address_of(vx[hk, 1, 16 * dt, row0]), vstride))
        T.evaluate(amx_op("tdpbf16ps", T.int8(dt % 4), T.int8(6), T.int8(4)))
        T.evaluate(amx_op("tdpbf16ps", T.int8(dt % 4), T.int8(6), T.int8(5)))
        T.evaluate(amx_op("tdpbf16ps", T.int8(dt % 4), T.int8(7), T.int8(4)))

    @T.macro
    def output_tiles(vx, ob, hk, row0, vstride, dt0):
        """O^T rows 16 * dt0 .. 16 * dt0 + 63 on tiles 0-3, stored to ob[d, token]."""
        T.evaluate(amx_op("tilezero", T.int8(0)))
        T.evaluate(amx_op("tilezero", T.int8(1)))
        T.evaluate(amx_op("tilezero", T.int8(2)))
        T.evaluate(amx_op("tilezero", T.int8(3)))
        output_tile(vx, hk, row0, vstride, dt0)
        output_tile(vx, hk, row0, vstride, dt0 + 1)
        output_tile(vx, hk, row0, vstride, dt0 + 2)
        output_tile(vx, hk, row0, vstride, dt0 + 3)
        T.evaluate(amx_op("tilestored64", T.int8(0), T.address_of(ob[16 * dt0, 0]), T.int64(64)))
        T.evaluate(amx_op("tilestored64", T.int8(1), T.address_of(ob[16 * (dt0 + 1), 0]), T.int64(64)))
        T.evaluate(amx_op("tilestored64", T.int8(2), T.address_of(ob[16 * (dt0 + 2), 0]), T.int64(64)))
        T.evaluate(amx_op("tilestored64", T.int8(3), T.address_of(ob[16 * (dt0 + 3), 0]), T.int64(64)))

    @T.macro
    def amx_tile(Qb, output, lse, q_indptr, causal, sm_scale, src, info, b, hk, q_n, t0, nq, first, kv_n, kv_hi,
                 kv_len, kx, vx):
        """The query heads' q, pre-scaled, converted once into the B operand layout (qx: pairs of consecutive d of
        a token in one 32-bit word, hi and lo); per chunk of AMX_CHUNK KV rows and query head: the scores, the
        softmax, the weights converted to B operand words (two consecutive rows of a token per word), the output
        tiles added to the rescaled output accumulator ot[d, token]."""
        tile_config()
        qx = T.alloc_buffer((grp, 2, d // 32, 16, QTILE), "uint32")
        ot = T.alloc_buffer((grp, d, QTILE), "float32")
        m = T.alloc_buffer((grp, QTILE), "float32", scope="global")
        den = T.alloc_buffer((grp, QTILE), "float32", scope="global")
        sc = T.alloc_buffer((AMX_CHUNK, QTILE), "float32")
        p = T.alloc_buffer((AMX_CHUNK, QTILE), "float32")
        pb = T.alloc_buffer((2, AMX_CHUNK // 2, QTILE), "uint32")
        ob = T.alloc_buffer((d, QTILE), "float32")
        st = T.alloc_buffer((2, QTILE), "float32", scope="global")  # new max, rescale factor of the output
        for g in range(grp):
            for dp in range(d // 2):
                for l in T.vectorized(QTILE):
                    qx[g, 0, dp // 16, dp % 16, l] = bf16_parts(
                        q_scaled(Qb, q_indptr, b, t0, l, q_n, hk, g, dp * 2, sm_scale),
                        q_scaled(Qb, q_indptr, b, t0, l, q_n, hk, g, dp * 2 + 1, sm_scale))[0]
                    qx[g, 1, dp // 16, dp % 16, l] = bf16_parts(
                        q_scaled(Qb, q_indptr, b, t0, l, q_n, hk, g, dp * 2, sm_scale),
                        q_scaled(Qb, q_indptr, b, t0, l, q_n, hk, g, dp * 2 + 1, sm_scale))[1]
            for dd in range(d):
                for l in T.vectorized(QTILE):
                    ot[g, dd, l] = T.float32(0)
            for l in T.vectorized(QTILE):
                m[g, l] = T.float32(-50000)
                den[g, l] = T.float32(1)
        for c in range((kv_hi + (AMX_CHUNK - 1)) // AMX_CHUNK):
            for g in range(grp):
                score_tiles(qx, kx, sc, g, hk, first + c * AMX_CHUNK)
                softmax(sc, p, m, den, st, g, c, AMX_CHUNK, kv_n, q_n, t0, causal, info, b)
                for i in range(AMX_CHUNK // 2):
                    for l in T.vectorized(QTILE):
                        pb[0, i, l] = bf16_parts(p[i * 2, l], p[i * 2 + 1, l], tiny=True)[0]
                        pb[1, i, l] = bf16_parts(p[i * 2, l], p[i * 2 + 1, l], tiny=True)[1]
                T.evaluate(amx_op("tileloadd64", T.int8(4), T.address_of(pb[0, 0, 0]), T.int64(64)))
                T.evaluate(amx_op("tileloadd64", T.int8(5), T.address_of(pb[1, 0, 0]), T.int64(64)))
                # head_dim 64 rows of O^T at a time (d <= 256: `ragged_prefill_kernel`)
                output_tiles(vx, ob, hk, first + c * AMX_CHUNK, T.Cast("int64", rows_pad(kv_len)) * T.int64(2), 0)
                if d > 64:  # a Python condition: decided when built
                    output_tiles(vx, ob, hk, first + c * AMX_CHUNK, T.Cast("int64", rows_pad(kv_len)) * T.int64(2), 4)
                if d > 128:
                    output_tiles(vx, ob, hk, first + c * AMX_CHUNK, T.Cast("int64", rows_pad(kv_len)) * T.int64(2), 8)
                if d > 192:
                    output_tiles(vx, ob, hk, first + c * AMX_CHUNK, T.Cast("int64", rows_pad(kv_len)) * T.int64(2),
                                 12)
                for dd in range(d):
                    for l in T.vectorized(QTILE):
                        ot[g, dd, l] = ot[g, dd, l] * st[1, l] + ob[dd, l]
        write(output, lse, q_indptr, b, hk, t0, nq, ot, m, den)
        T.evaluate(amx_op("tilerelease"))

    @T.macro
    def convert_kv(Kb, Vb, kv_len, kx, vx):
        """K rows as they are (kx: the A operand of the scores) and V transposed (vx: rows = head_dim, the A operand
        of the output), in bfloat16 hi / lo parts, padded past the last row (which the padding repeats)."""
        if kv_len > 0:
            for row in T.parallel(rows_pad(kv_len)):
                for hk in range(hkv):
                    for dd in T.vectorized(d):
                        kx[hk, 0, row, dd] = bf16_parts(Kb[T.min(row, kv_len - 1), hk, dd])[0]
                        kx[hk, 1, row, dd] = bf16_parts(Kb[T.min(row, kv_len - 1), hk, dd])[1]
            for hd in T.parallel(hkv * d):
                for rc in range(rows_pad(kv_len) // 16):
                    for l in T.vectorized(16):
                        vx[hd // d, 0, hd % d, rc * 16 + l] = bf16_parts(Vb[T.min(rc * 16 + l, kv_len - 1), hd // d,
                                                                            hd % d])[0]
                        vx[hd // d, 1, hd % d, rc * 16 + l] = bf16_parts(Vb[T.min(rc * 16 + l, kv_len - 1), hd // d,
                                                                            hd % d])[1]

    # --- the tasks: tiles numbered over the sequences (a prelude counts them), handed out first, last, second,
    # second to last, ...: each thread first runs its own contiguous range of them (TVM's split), and with `causal`
    # a later tile has more rows to read; then it takes the tasks left in the other threads' ranges (work stealing)
    @T.macro
    def tile_task(task, tile_body, n_tiles, Qb, output, lse, q_indptr, batch_size, causal, sm_scale, kv_indptr, src,
                  info, extra):
        pos = T.bind(task // hkv)
        hk = T.bind(task % hkv)
        tile = T.bind(T.if_then_else(pos % 2 == 0, pos // 2, n_tiles[0] - 1 - pos // 2))
        loc = T.alloc_buffer((3,), "int32", scope="global")  # the tile's sequence, its first tile, tiles so far
        loc[0] = 0
        loc[1] = 0
        loc[2] = 0
        for bb in range(batch_size):
            nt = T.bind((q_indptr[bb + 1] - q_indptr[bb] + (QTILE - 1)) // QTILE)
            if loc[2] <= tile and tile < loc[2] + nt:
                loc[0] = bb
                loc[1] = loc[2]
            loc[2] = loc[2] + nt
        b = T.bind(loc[0])
        q_n = T.bind(q_indptr[b + 1] - q_indptr[b])
        t0 = T.bind((tile - loc[1]) * QTILE)
        nq = T.bind(T.min(QTILE, q_n - t0))
        if paged:  # first: the sequence's first page; kv_n: its KV rows (the last page holds info's rows)
            first = T.bind(kv_indptr[b])
            npg = T.bind(kv_indptr[b + 1] - first)
            kv_n = T.bind(T.if_then_else(npg > 0, (npg - 1) * PAGE + last_rows(info, b), 0))
        else:  # first: the sequence's first new KV row
            first = T.bind(kv_indptr[b])
            kv_n = T.bind(kv_indptr[b + 1] - first)
        if windowed:  # with a window the ragged kernel does the causal part
            kv_hi = T.bind(kv_n)
        else:
            kv_hi = T.bind(T.if_then_else(causal > 0, T.min(kv_n, kv_n - q_n + t0 + nq), kv_n))
        tile_body(Qb, output, lse, q_indptr, causal, sm_scale, src, info, b, hk, q_n, t0, nq, first, kv_n, kv_hi,
                  *extra)

    @T.macro
    def all_tiles(tile_body, Qb, output, lse, q_indptr, batch_size, qo_len, causal, sm_scale, kv_indptr, src, info,
                  extra):
        n_tiles = T.alloc_buffer((1,), "int32", scope="global")
        n_tiles[0] = 0
        for bb in range(batch_size):
            n_tiles[0] = n_tiles[0] + (q_indptr[bb + 1] - q_indptr[bb] + (QTILE - 1)) // QTILE
        # capacity: >= the tasks (tiles x KV heads)
        steal(n_tiles[0] * hkv, tile_task, (tile_body, n_tiles, Qb, output, lse, q_indptr, batch_size, causal,
                                            sm_scale, kv_indptr, src, info, extra),
              dtype="int32", capacity=((qo_len + (QTILE - 1)) // QTILE + batch_size) * hkv)

    @T.macro
    def run(Qb, output, lse, q_indptr, batch_size, qo_len, causal, sm_scale, kv_indptr, src, info, kv_len):
        if amx:  # a Python condition: decided when built
            perm = T.alloc_buffer((1,), "int64", scope="global")
            perm[0] = request_amx()
            if perm[0] == T.int64(0) and kv_len >= amx_min_rows * batch_size:
                kx = T.alloc_buffer((hkv, 2, rows_pad(kv_len), d), "uint16")
                vx = T.alloc_buffer((hkv, 2, d, rows_pad(kv_len)), "uint16")
                convert_kv(src[0], src[1], kv_len, kx, vx)
                all_tiles(amx_tile, Qb, output, lse, q_indptr, batch_size, qo_len, causal, sm_scale, kv_indptr, src,
                          info, (kv_len, kx, vx))
            else:
                all_tiles(vector_tile, Qb, output, lse, q_indptr, batch_size, qo_len, causal, sm_scale, kv_indptr,
                          src, info, ())
        else:
            all_tiles(vector_tile, Qb, output, lse, q_indptr, batch_size, qo_len, causal, sm_scale, kv_indptr, src,
                      info, ())

    def info_shape(batch_size):
        return (3, batch_size) if windowed else (batch_size,)

    @T.macro
    def with_queries(var_q, var_q_indptr, var_q_rope_position, var_k_rope_pos_offset, var_output, var_lse,
                     batch_size, causal, sm_scale, kv_indptr, src, info, kv_len):
        """The parameters both signatures share (the new tokens' queries and outputs), then the kernel."""
        qo_len = T.int32()
        q_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        Qb = T.match_buffer(var_q, (qo_len, hq, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32",  # noqa: F841
                                         elem_offset=q_rope_position_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32",  # noqa: F841
                                           elem_offset=k_rope_pos_offset_elem_offset)
        output = T.match_buffer(var_output, (qo_len, hq, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, hq), "float32")
        run(Qb, output, lse, q_indptr, batch_size, qo_len, causal, sm_scale, kv_indptr, src, info, kv_len)

    # TVM's signatures: ragged (q, k, v of the new tokens) and paged (q, the KV pages)
    if paged:
        @T.prim_func(s_tir=True)
        def main(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                 var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                 var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32,
                 rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
            T.func_attr({"tirx.noalias": True})
            batch_size = T.int32()
            nnz_pages = T.int32()
            max_num_pages = T.int32()
            page_indptr_elem_offset = T.int32()
            page_values_elem_offset = T.int32()
            length_info_elem_offset = T.int32()
            pages = T.match_buffer(var_pages, (max_num_pages, 2, hkv, PAGE, d), dtype)
            page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32",
                                         elem_offset=page_indptr_elem_offset)
            page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
            length_info = T.match_buffer(var_length_info, info_shape(batch_size), "int32",
                                         elem_offset=length_info_elem_offset)
            with_queries(var_q, var_q_indptr, var_q_rope_position, var_k_rope_pos_offset, var_output, var_lse,
                         batch_size, causal, sm_scale, page_indptr, (pages, page_values), length_info, None)
        return main

    @T.prim_func(s_tir=True)
    def main(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_kv_indptr: T.handle,
             var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
             causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.noalias": True})
        batch_size = T.int32()
        kv_len = T.int32()
        kv_indptr_elem_offset = T.int32()
        Kb = T.match_buffer(var_k, (kv_len, hkv, d), dtype)
        Vb = T.match_buffer(var_v, (kv_len, hkv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        with_queries(var_q, var_q_indptr, var_q_rope_position, var_k_rope_pos_offset, var_output, var_lse,
                     batch_size, causal, sm_scale, kv_indptr, (Kb, Vb), None, kv_len)
    return main  # noqa: F811


def ragged_prefill_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, amx: bool = False,
                          amx_min_rows: int = AMX_MIN_ROWS) -> tvm.tirx.PrimFunc:
    """Same parameters as TVM's `_attention_prefill_ragged_cpu` (new tokens against themselves). head_dim must be a
    multiple of 8 (`install` keeps TVM's kernel otherwise). A sequence with no KV gives 0 and lse -5e4, as the stock
    kernel does. `amx`: on AMX tiles (float32 with head_dim a multiple of 64 up to 256, else the vector kernel) from
    `amx_min_rows` new KV rows per sequence on average."""
    on_tiles = amx and head_dim % 64 == 0 and head_dim <= 256 and dtype == "float32"
    return _prefill_kernel(False, num_q_heads, num_kv_heads, head_dim, dtype, on_tiles, amx_min_rows)


def paged_prefill_kernel(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str,
                         window: int = 0) -> tvm.tirx.PrimFunc:
    """Same parameters as TVM's `_attention_prefill_cpu` (new tokens against a sequence's KV pages: the KV rows are
    the pages' rows, the last page holding length_info[b]); the ragged kernel's tiles with each 16-row chunk a page.
    Assumes RoPE applied before the cache (rotary_mode 0), as the decode kernel. `window` > 0: the windowed layers'
    variant (TVM's with sliding_window_size = window; length_info [3, B]: the last page's rows, the offset of the
    first row in use, the attention-sink rows): rows between the sink and the offset masked and, with `causal`,
    query token i of the chunk sees only the last max(window - i - 1, 0) rows of the history (the rest of its window
    is among the new tokens: the ragged kernel's part)."""
    return _prefill_kernel(True, num_q_heads, num_kv_heads, head_dim, dtype, window=window)


# RoPE on the fused qkv of new tokens, split into q, k, v (replaces TVM's serial `tir_split_rotary`, which evaluates
# pow, cos and sin for every (token, head, dim)): the powers once per call, each token's angles once, tokens in
# parallel.
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
