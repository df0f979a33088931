"""The CPU attention kernels (compiler/cpu_attention.py: decode, ragged and paged prefill, RoPE) against numpy and
against TVM's stock kernels, on paged KV with ragged lengths (a partial last page, an empty sequence, GQA groups)."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

from mlc_llm.compiler import cpu_attention
from mlc_llm.compiler.cpu.vecmath import exp2

PAGE = cpu_attention.PAGE


def _inputs(rng, lengths, hq, hkv, d):
    pages_per_seq = [-(-n // PAGE) for n in lengths]
    total = sum(pages_per_seq)
    order = rng.permutation(total + 3)[:total].astype(np.int32)  # scattered pages, some unused
    pages = rng.standard_normal((total + 3, 2, hkv, PAGE, d)).astype(np.float32)
    indptr = np.concatenate([[0], np.cumsum(pages_per_seq)]).astype(np.int32)
    last = np.array([(n - 1) % PAGE + 1 if n else 0 for n in lengths], np.int32)
    q = rng.standard_normal((len(lengths), hq, d)).astype(np.float32)
    return q, pages, indptr, order, last


def _reference(q, pages, indptr, values, lengths, hq, hkv, d, sm_scale):
    out = np.zeros(q.shape, np.float64)
    lse = np.full(q.shape[:2], -5e4)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        rows = [(values[indptr[b] + i // PAGE], i % PAGE) for i in range(n)]
        for h in range(hq):
            hk = h // (hq // hkv)
            k = np.stack([pages[p, 0, hk, r] for p, r in rows]).astype(np.float64)
            v = np.stack([pages[p, 1, hk, r] for p, r in rows]).astype(np.float64)
            s = k @ q[b, h].astype(np.float64) * sm_scale * math.log2(math.e)
            w = np.exp2(s - s.max())
            out[b, h] = w @ v / w.sum()
            lse[b, h] = s.max() + math.log2(w.sum())
    return out, lse


@functools.lru_cache(maxsize=None)
def _decode_lib(stock: bool, hq: int, hkv: int, d: int):
    """Our decode kernel or TVM's stock one for these heads, compiled for this CPU once per test session."""
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    func = (_attention_decode_cpu(hkv, hq, d, "float32", False, {}) if stock
            else cpu_attention.decode_kernel(hq, hkv, d, "float32"))
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       target=tvm.target.Target.from_device(tvm.cpu()))


def _run(lib, q, pages, indptr, values, last, sm_scale):
    dev = tvm.cpu()
    b = q.shape[0]
    t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    out = t(np.full(q.shape, np.nan, np.float32))
    lse = t(np.full(q.shape[:2], np.nan, np.float32))
    zeros = np.zeros(b, np.int32)
    lib["main"](t(q), t(pages), t(indptr), t(values), t(last), t(zeros), t(zeros), out, lse, 0, 1.0, 10000.0,
                sm_scale)
    return out.numpy(), lse.numpy()


# Batches of 5 split each (sequence, KV head) in 2-3 tasks; one sequence in 8-11 (more tasks than pages at 5 rows).
@pytest.mark.parametrize("lengths", [[1, 16, 37, 0, 300], [300], [5], [0]])
@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 32)])
def test_decode_attention_matches_numpy_and_the_stock_kernel(hq, hkv, d, lengths):
    rng = np.random.default_rng(hq * d + len(lengths))
    q, pages, indptr, values, last = _inputs(rng, lengths, hq, hkv, d)
    sm_scale = d ** -0.5
    out, lse = _run(_decode_lib(False, hq, hkv, d), q, pages, indptr, values, last, sm_scale)
    ref_out, ref_lse = _reference(q, pages, indptr, values, lengths, hq, hkv, d, sm_scale)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5, atol=1e-4)
    stock_out, stock_lse = _run(_decode_lib(True, hq, hkv, d), q, pages, indptr, values, last, sm_scale)
    np.testing.assert_allclose(out, stock_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, stock_lse, rtol=1e-5, atol=1e-4)


def test_exp2_polynomial():
    """The kernel's exp2 (through a tiny kernel that applies it to a vector) vs numpy, incl. underflow to ~0."""
    @T.prim_func(s_tir=True)
    def func(x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")):
        for i in T.vectorized(64):
            y[i] = exp2(x[i])

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target.from_device(tvm.cpu()))
    x = np.concatenate([-np.linspace(0, 30, 60), [-200.0, -1e30, -0.5, -1e-7]]).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros(64, np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    expected = np.exp2(x.astype(np.float64))
    np.testing.assert_allclose(y.numpy()[:60], expected[:60], rtol=3e-7)
    assert np.all(y.numpy()[60:62] < 1e-37) and abs(y.numpy()[62] - 2 ** -0.5) < 1e-7


def _run_prefill(func, inputs, causal, sm_scale):
    """A prefill kernel compiled for this CPU, run on `inputs` (the arrays before output and lse; q first):
    (output, lse)."""
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target.from_device(dev))
    out = t(np.full(inputs[0].shape, np.nan, np.float32))
    lse = t(np.full(inputs[0].shape[:2], np.nan, np.float32))
    lib["main"](*map(t, inputs), out, lse, causal, 0, 1.0, 10000.0, sm_scale)
    return out.numpy(), lse.numpy()


def _check_prefill(ours, stock, ref_out, ref_lse, tol=1e-5):
    """Our kernel's (output, lse) against the float64 reference and against TVM's kernel's (outputs within `tol`,
    lse within 10 `tol`)."""
    (out, lse), (stock_out, stock_lse) = ours, stock
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, ref_lse, rtol=tol, atol=10 * tol)
    np.testing.assert_allclose(out, stock_out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, stock_lse, rtol=tol, atol=10 * tol)


def _ragged_case(causal, q_lens, kv_lens, hq, hkv, d):
    """Random q, k, v of a ragged batch, the kernel's inputs (before output and lse) and the float64 reference."""
    rng = np.random.default_rng(causal)
    q = rng.standard_normal((sum(q_lens), hq, d)).astype(np.float32)
    k = rng.standard_normal((sum(kv_lens), hkv, d)).astype(np.float32)
    v = rng.standard_normal((sum(kv_lens), hkv, d)).astype(np.float32)
    q_indptr = np.cumsum([0] + q_lens).astype(np.int32)
    kv_indptr = np.cumsum([0] + kv_lens).astype(np.int32)
    sm_scale = d ** -0.5
    ref_out = np.zeros(q.shape)
    ref_lse = np.zeros(q.shape[:2])
    for b in range(len(q_lens)):
        for i in range(q_lens[b]):
            limit = kv_lens[b] - q_lens[b] + i + 1 if causal else kv_lens[b]
            kk = k[kv_indptr[b]:kv_indptr[b] + limit].astype(np.float64)
            vv = v[kv_indptr[b]:kv_indptr[b] + limit].astype(np.float64)
            for h in range(hq):
                s = kk[:, h // (hq // hkv)] @ q[q_indptr[b] + i, h] * sm_scale * math.log2(math.e)
                w = np.exp2(s - s.max())
                ref_out[q_indptr[b] + i, h] = w @ vv[:, h // (hq // hkv)] / w.sum()
                ref_lse[q_indptr[b] + i, h] = s.max() + math.log2(w.sum())
    inputs = [q, q_indptr, k, v, kv_indptr, np.zeros(len(q), np.int32), np.zeros(len(q_lens), np.int32)]
    return inputs, sm_scale, ref_out, ref_lse


@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,d", [([37, 5], [37, 21], 9, 3, 64),
                                                     ([16, 0, 49, 1], [16, 0, 60, 1], 9, 3, 64),
                                                     ([70, 3], [75, 3], 4, 2, 40)])
def test_ragged_prefill_attention_matches_numpy_and_the_stock_kernel(causal, q_lens, kv_lens, hq, hkv, d):
    """Sequences in one ragged batch (tiles of 16 query tokens: full, partial, an empty sequence, one token), some
    with more KV rows than queries (the causal offset, aligned to 16 rows or not), GQA 9/3 and 4/2, head_dim 64 and 40
    (not a multiple of 16)."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    inputs, sm_scale, ref_out, ref_lse = _ragged_case(causal, q_lens, kv_lens, hq, hkv, d)
    ours, stock = (_run_prefill(f, inputs, causal, sm_scale)
                   for f in (cpu_attention.ragged_prefill_kernel(hq, hkv, d, "float32"),
                             _attention_prefill_ragged_cpu(hkv, hq, d, d, "float32", {})))
    _check_prefill(ours, stock, ref_out, ref_lse)



@pytest.mark.amx
@pytest.mark.parametrize("causal", [1, 0])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,d", [([37, 5], [37, 21], 9, 3, 64),
                                                     ([16, 0, 49, 1], [16, 0, 60, 1], 9, 3, 64),
                                                     ([70, 3], [75, 3], 4, 2, 128),
                                                     ([200], [200], 9, 3, 64)])
def test_ragged_prefill_attention_on_amx_tiles(causal, q_lens, kv_lens, hq, hkv, d):
    """The AMX kernel (operands in two bfloat16 parts, 16 significant bits): the same batches, head_dim 64 and 128
    (two passes of output tiles), within 5e-5 of the float64 reference (the float32 vector kernel: ~1e-6; bfloat16
    operands: ~1e-2), and not the vector kernel's result (the tiles ran). The tiles are forced (amx_min_rows=0);
    with the default threshold the short batches take the vector kernel, the 200-token sequence the tiles."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    inputs, sm_scale, ref_out, ref_lse = _ragged_case(causal, q_lens, kv_lens, hq, hkv, d)
    stock = _run_prefill(_attention_prefill_ragged_cpu(hkv, hq, d, d, "float32", {}), inputs, causal, sm_scale)
    tiles, vec, default = (_run_prefill(cpu_attention.ragged_prefill_kernel(hq, hkv, d, "float32", **kw), inputs,
                                        causal, sm_scale)
                           for kw in (dict(amx=True, amx_min_rows=0), {}, dict(amx=True)))
    _check_prefill(tiles, stock, ref_out, ref_lse, tol=5e-5)
    _check_prefill(vec, stock, ref_out, ref_lse)
    assert np.abs(tiles[0] - vec[0]).max() > 1e-7
    _check_prefill(default, stock, ref_out, ref_lse, tol=5e-5)
    long = sum(kv_lens) >= cpu_attention.AMX_MIN_ROWS * len(kv_lens)
    np.testing.assert_array_equal(default[0], (tiles if long else vec)[0])


@pytest.mark.amx
def test_amx_attention_falls_back_to_the_vector_kernel_when_linux_refuses_amx(monkeypatch):
    """Refused the tile state (the request syscall made to fail), the AMX kernel must give the vector kernel's
    result bit for bit."""
    inputs, sm_scale, _, _ = _ragged_case(1, [37, 5], [37, 21], 9, 3, 64)
    from mlc_llm.compiler.cpu import amx

    monkeypatch.setattr(amx, "SYS_ARCH_PRCTL", -1)  # built with an invalid syscall number
    func = cpu_attention.ragged_prefill_kernel(9, 3, 64, "float32", amx=True, amx_min_rows=0)
    assert '"syscall", T.int64(-1)' in func.script()
    refused, vec = (_run_prefill(f, inputs, 1, sm_scale)
                    for f in (func, cpu_attention.ragged_prefill_kernel(9, 3, 64, "float32")))
    np.testing.assert_array_equal(refused[0], vec[0])
    np.testing.assert_array_equal(refused[1], vec[1])


@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("q_lens,kv_lens,hq,hkv,d", [([5, 40, 0, 1], [37, 40, 16, 300], 9, 3, 64),
                                                     ([20], [33], 4, 2, 40)])
def test_paged_prefill_attention_matches_numpy_and_the_stock_kernel(causal, q_lens, kv_lens, hq, hkv, d):
    """New tokens against their sequences' KV pages (prefill with history, chunked prefill): scattered pages, a
    partial last page, a sequence with pages but no new tokens, one token over 300 rows, more rows than tokens (the
    causal offset, aligned to 16 rows or not)."""
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu

    rng = np.random.default_rng(causal * 7 + d)
    _, pages, indptr, values, last = _inputs(rng, kv_lens, hq, hkv, d)
    q = rng.standard_normal((sum(q_lens), hq, d)).astype(np.float32)
    q_indptr = np.cumsum([0] + q_lens).astype(np.int32)
    sm_scale = d ** -0.5
    ref_out, ref_lse = np.zeros(q.shape), np.zeros(q.shape[:2])
    for b, (nq, nkv) in enumerate(zip(q_lens, kv_lens)):
        rows = [(values[indptr[b] + i // PAGE], i % PAGE) for i in range(nkv)]
        for i in range(nq):
            limit = nkv - nq + i + 1 if causal else nkv
            for h in range(hq):
                hk = h // (hq // hkv)
                k = np.stack([pages[pg, 0, hk, r] for pg, r in rows[:limit]]).astype(np.float64)
                v = np.stack([pages[pg, 1, hk, r] for pg, r in rows[:limit]]).astype(np.float64)
                s = k @ q[q_indptr[b] + i, h] * sm_scale * math.log2(math.e)
                w = np.exp2(s - s.max())
                ref_out[q_indptr[b] + i, h] = w @ v / w.sum()
                ref_lse[q_indptr[b] + i, h] = s.max() + math.log2(w.sum())
    inputs = [q, q_indptr, pages, indptr, values, last, np.zeros(len(q_lens), np.int32), np.zeros(len(q), np.int32)]
    ours, stock = (_run_prefill(f, inputs, causal, sm_scale)
                   for f in (cpu_attention.paged_prefill_kernel(hq, hkv, d, "float32"),
                             _attention_prefill_cpu(hkv, hq, d, "float32", False, {})))
    _check_prefill(ours, stock, ref_out, ref_lse)


@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rope_kernel_matches_the_stock_kernel(rotary_dim):
    """Our RoPE + split (angles once per token) against TVM's `llama_rope_with_position_map`, with and without
    apply_rope, for 1 and 7 tokens at large positions (where the f32 angle formula matters)."""
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    hq, hkv, d, theta = 9, 3, 64, 100000.0
    dev = tvm.cpu()
    build = lambda f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),  # noqa: E731
                                  target=tvm.target.Target.from_device(dev))["main"]
    stock = build(llama_rope_with_position_map(theta, 1.0, d, hq, hkv, "float32", {}, rotary_dim))
    ours = build(cpu_attention.rope_kernel(hq, hkv, d, "float32", theta, 1.0, rotary_dim))
    rng = np.random.default_rng(rotary_dim)
    for n in (1, 7):
        qkv = tvm.runtime.tensor(rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float32), dev)
        pos = tvm.runtime.tensor(rng.integers(0, 9000, n).astype(np.int32), dev)
        for apply_rope in (1, 0):
            results = []
            for f in (stock, ours):
                outs = [tvm.runtime.tensor(np.full((n, h, d), np.nan, np.float32), dev) for h in (hq, hkv, hkv)]
                f(qkv, pos, *outs, apply_rope)
                results.append([o.numpy() for o in outs])
            for a, b in zip(*results):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
