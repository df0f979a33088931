"""The int8-activation decode GEMV (`decode_precision: int8`, compiler/cpu_q4_int8.py) against a numpy reference of
the same quantization, computed independently (integer dot products in int64, float64 scaling), and against the
exact float64 product; where the compiler puts it in a model. (Whole-model logits: test_numerics.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from mlc_llm.compiler import cpu_gemv, cpu_q4_int8
from mlc_llm.compiler.cpu import tasks as cpu_tasks
from mlc_llm.compiler.target import make_target
from mlc_llm.quantization.scheme import block_rows, dequantize_q4, quantize_q4

from .tiny_hf import write_tiny_hf

HOST = make_target("cpu")


def int8_reference(x: np.ndarray, q: np.ndarray, s: np.ndarray, k: int) -> np.ndarray:
    """x [R, K] . w^T with x quantized per group of 32 to round-half-even(x * 127 / max|x|), scale max|x| / 127:
    integer dot products with the weights' (q - 7), times both scales, summed over groups in float64."""
    rows, groups = x.shape[0], k // 32
    xg = x.reshape(rows, groups, 32)
    amax = np.abs(xg).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).astype(np.int64)
    assert np.abs(xq).max() <= 127
    wq = dequantize_q4(q, np.ones_like(s), k).astype(np.int64).reshape(-1, groups, 32)  # q - 7
    dots = np.einsum("rgk,ngk->rng", xq, wq)
    x_scale = (amax / np.float32(127)).astype(np.float64)
    return (dots * s.astype(np.float64)[None] * x_scale[:, None, :]).sum(-1)


def _run(func, args, rows: int, n: int, layout: str) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=HOST)
    out = tvm.runtime.tensor(np.full(_shape(layout, rows, n), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy().reshape(rows, n)


def _shape(layout: str, rows: int, width: int) -> tuple[int, int, int]:
    return (rows, 1, width) if layout == "b1" else (1, rows, width)


@pytest.mark.vnni
@pytest.mark.parametrize("layout", ["b1", "1s"])
@pytest.mark.parametrize("n,k,residual,scale_dtype", [
    (960, 576, False, "float32"), (3072, 576, False, "float32"), (576, 1536, True, "float32"),
    (1152, 896, cpu_gemv.BIAS, "float32"), (576, 1536, True, "float16"), (1152, 896, cpu_gemv.BIAS, "float16")])
def test_int8_gemv_matches_the_numpy_int8_reference(n, k, residual, scale_dtype, layout):
    """Rows (decode "b1": [R, 1, K]; prefill "1s": [1, R, K]) 1 (its own path), 3, 4, 9 and 37 (tiles of 4, the last
    one partial); one all-zero group and one all-zero row (scale 0: the output is the epilogue alone). Within float32
    rounding of the int8 reference, within the quantization's error of the exact product, and every row bit for bit
    what it is in a batch of one."""
    rng = np.random.default_rng(n + k)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), scale_dtype)
    w = dequantize_q4(q, s, k).astype(np.float64)
    func = cpu_q4_int8.gemv_kernel(n, k, layout, residual, scale_dtype=scale_dtype)
    for rows in (1, 3, 4, 9, 37):
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[0, 32:64] = 0
        if rows > 1:
            x[1] = 0
        r = rng.standard_normal((n,) if residual == cpu_gemv.BIAS else (rows, n)).astype(np.float32)
        add = r if residual else 0
        as_arg = lambda a: a.reshape(_shape(layout, a.shape[0], a.shape[1]))  # noqa: E731
        res = (r if residual == cpu_gemv.BIAS else as_arg(r),) if residual else ()
        y = _run(func, (block_rows(q), block_rows(s), as_arg(x)) + res, rows, n, layout)
        exact = x.astype(np.float64) @ w.T + add
        scale = np.abs(exact).max()
        assert np.abs(y - (int8_reference(x, q, s, k) + add)).max() < 2e-6 * scale, rows
        err = np.abs(y - exact).max() / scale
        assert 1e-4 < err < 2e-2, (rows, err)  # int8 activations: not the float32 result, close to it
        if rows > 1:
            np.testing.assert_array_equal(y[1], np.broadcast_to(add, (rows, n))[1])
            res1 = (r if residual == cpu_gemv.BIAS else as_arg(r[:1]),) if residual else ()
            one = _run(func, (block_rows(q), block_rows(s), as_arg(x[:1])) + res1, 1, n, layout)
            np.testing.assert_array_equal(y[0], one[0])


@pytest.mark.vnni
def test_int8_work_stealing_gives_the_static_splits_bits():
    """From STEAL_MIN_BLOCKS blocks the block loop claims tasks atomically (cpu.tasks.steal); below, TVM's static
    split. Either way every output is what the static split computes, bit for bit."""
    n, k = 64 * cpu_q4_int8.STEAL_MIN_BLOCKS, 576
    assert cpu_tasks.FETCH_ADD in cpu_q4_int8.gemv_kernel(n, k, "b1", True).script()
    assert cpu_tasks.FETCH_ADD not in cpu_q4_int8.gemv_kernel(n - 64, k, "b1", True).script()
    rng = np.random.default_rng(5)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), "float16")
    for rows in (1, 9):
        x = rng.standard_normal((rows, 1, k)).astype(np.float32)
        r = rng.standard_normal((rows, 1, n)).astype(np.float32)
        args = (block_rows(q), block_rows(s), x, r)
        ys = [_run(cpu_q4_int8.gemv_kernel(n, k, "b1", True, scale_dtype="float16", stealing=st), args, rows, n, "b1")
              for st in (True, False)]
        np.testing.assert_array_equal(ys[0], ys[1])


def test_int8_is_refused_where_it_cannot_run():
    from mlc_llm.compiler.cpu_schedules import schedule_cpu_matmuls

    with pytest.raises(ValueError, match="allowed: f32, int8"):
        schedule_cpu_matmuls(HOST, "f32", "int4")
    no_vnni = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": "skylake-avx512"})
    with pytest.raises(ValueError, match="needs AVX512-VNNI"):
        schedule_cpu_matmuls(no_vnni, "f32", "int8")
    with pytest.raises(ValueError, match="N % 64 == 0"):
        cpu_q4_int8.gemv_kernel(100, 64)


@pytest.mark.vnni
@pytest.mark.parametrize("prefill,decode,quant", [("f32", "int8", "q4f32_cpu"), ("int8", "f32", "q4f32_cpu"),
                                                  ("int8", "int8", "q4f32_cpu"), ("int8", "int8", "q4f32_cpu_f16scale")])
def test_int8_replaces_the_kernels_of_its_phase(tmp_path, prefill, decode, quant):
    """With decode_precision int8 every blocked linear layer of the decode functions (x of [B, 1, K]) gets the int8
    kernel, with prefill_precision int8 every one of the prefill functions ([1, S, K]); the other phase keeps the
    float32 blocked kernel; a non-blocked quantization is refused."""
    from mlc_llm.steps.compile import CompileError, optimized_module
    from mlc_llm.steps.gen_config import gen_config

    write_tiny_hf(tmp_path / "hf")
    gen_config(str(tmp_path / "hf"), quant, "chatml", tmp_path / "out")
    mod, _ = optimized_module(tmp_path / "out", "cpu", prefill_precision=prefill, decode_precision=decode)
    marks = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs.get(cpu_gemv.KERNEL_ATTR, "").startswith("q4_blocked64"):
            marks[gv] = f.attrs[cpu_gemv.KERNEL_ATTR]
    int8 = {gv for gv, m in marks.items() if m == "q4_blocked64_int8"}
    calls = lambda fn: {gv for gv in marks if f"R.call_tir({gv.name_hint}," in mod[fn].script()}  # noqa: E731
    for fn, precision in (("batch_decode", decode), ("batch_prefill", prefill)):
        assert calls(fn), fn
        if precision == "int8":  # the prefill's last-token lm_head ([1, 1, K]) stays float32
            assert len(calls(fn) & int8) >= len(calls(fn)) - 1, fn
        else:
            assert not calls(fn) & int8, fn
    gen_config(str(tmp_path / "hf"), "q4f32_1", "chatml", tmp_path / "nk")
    with pytest.raises(CompileError, match="row-blocked int4 weights"):
        optimized_module(tmp_path / "nk", "cpu", decode_precision="int8")


def test_software_prefetch_follows_the_target():
    """The decode GEMVs prefetch ahead in software on Intel targets and not on AMD Zen (where it made decode
    slower): both the float32 and the int8 kernels, as the compiler picks them."""
    from mlc_llm.compiler import cpu_q4_blocked

    intel = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": "sapphirerapids"})
    amd = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": "znver4"})
    assert cpu_q4_blocked.prefetch_pays(intel) and not cpu_q4_blocked.prefetch_pays(amd)
    for ahead in (True, False):
        kernels = [cpu_q4_blocked.blocked_kernel(576, 1536, "b1", True, prefetch_ahead=ahead),
                   cpu_q4_int8.gemv_kernel(576, 1536, "b1", True, prefetch_ahead=ahead)]
        for func in kernels:
            assert ("llvm.prefetch" in func.script()) == ahead
