"""The CPU schedule of the linear layers: applied to every matmul kernel, and numerically exact per kernel.
(Whole-model logits against the numpy reference, with these kernels, are in test_numerics.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from mlc_llm.compiler import cpu_gemv, cpu_q4_blocked
from mlc_llm.compiler.cpu.text import parse
from mlc_llm.compiler.cpu_schedules import schedule_nt_matmul
from mlc_llm.quantization.scheme import block_rows, dequantize_q4, quantize_q4

from .tiny_hf import write_tiny_hf


@pytest.mark.parametrize("quant", ["q4f32_1", "q4f32_cpu", "q4f32_cpu_f16scale", "q0f32"])
def test_every_cpu_matmul_kernel_is_scheduled(tmp_path, quant):
    from mlc_llm.steps.compile import optimized_module
    from mlc_llm.steps.gen_config import gen_config

    write_tiny_hf(tmp_path / "hf")
    gen_config(str(tmp_path / "hf"), quant, "chatml", tmp_path / "out")
    mod, _ = optimized_module(tmp_path / "out", "cpu")
    kernels = {gv.name_hint: f for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and "NT_matmul" in gv.name_hint}
    assert len(kernels) >= 8  # qkv, o, gate_up, down, lm_head for decode and prefill
    for name, f in kernels.items():
        text = f.script()
        assert "T.parallel" in text and "T.vectorized" in text, name
        assert "dequantize_intermediate" not in text, name  # int4 decoded in registers, not into a buffer
        # q4f32_cpu[_f16scale] layers with N % 64 == 0 are stored in row blocks and get the blocked kernel
        # (cpu_q4_blocked.py); other q4f32 linear layers the batch-tiled kernel (cpu_gemv.py); unquantized ones and
        # output sizes that are not a multiple of 8 rows (the tiny vocab of 300) the rfactor schedule
        n_out = int(f.params[-1].shape[-1])
        expected = ("q4_blocked64" if quant.startswith("q4f32_cpu") and n_out % 64 == 0 else
                    "q4_row_tiled" if quant.startswith("q4f32") and n_out % 8 == 0 else None)
        assert f.attrs.get(cpu_gemv.KERNEL_ATTR) == expected, name
        if expected == "q4_blocked64":
            assert str(f.params[1].dtype) == ("float16" if quant.endswith("f16scale") else "float32"), name
    if quant.startswith("q4f32_cpu"):  # the tiny model has both kinds of layer
        assert {f.attrs.get(cpu_gemv.KERNEL_ATTR) for f in kernels.values()} == {"q4_blocked64", None}


def _kernel(n: int, k: int, epilogue: bool):
    from tvm import te

    b = tvm.tirx.Var("batch_size", "int64")
    q = te.placeholder((n, k // 8), "uint32", name="q")
    s = te.placeholder((n, k // 32), "float32", name="s")
    x = te.placeholder((b, 1, k), "float32", name="x")
    w = te.compute((n, k), lambda i, j: ((q[i, j // 8] >> (j % 8 * 4).astype("uint32") & tvm.tirx.const(15, "uint32"))
                                         .astype("float32") - 7.0) * s[i, j // 32], name="dequantize")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((b, 1, n), lambda i0, i1, i2: te.sum(x[i0, i1, r] * w[i2, r], axis=r), name="NT_matmul")
    args = [q, s, x]
    if epilogue:
        res = te.placeholder((b, 1, n), "float32", name="res")
        y = te.compute((b, 1, n), lambda i0, i1, i2: y[i0, i1, i2] + res[i0, i1, i2], name="T_add")
        args.append(res)
    return te.create_prim_func(args + [y])


@pytest.mark.parametrize("n,k,batch,epilogue", [(96, 64, 1, False), (100, 96, 3, True), (8, 32, 5, False)])
def test_scheduled_kernel_matches_numpy(n, k, batch, epilogue):
    rng = np.random.default_rng(n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q, s = quantize_q4(w, "float32")
    x = rng.standard_normal((batch, 1, k)).astype(np.float32)
    res = rng.standard_normal((batch, 1, n)).astype(np.float32)
    expected = x.astype(np.float64) @ dequantize_q4(q, s, k).astype(np.float64).T
    if epilogue:
        expected = expected + res
    func = schedule_nt_matmul(_kernel(n, k, epilogue))
    assert func is not None
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target.from_device(tvm.cpu()))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in ([q, s, x] + ([res] if epilogue else []))]
    out = tvm.runtime.tensor(np.zeros((batch, 1, n), np.float32), dev)
    lib["main"](*args, out)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["b1", "1s", "11"])
@pytest.mark.parametrize("n,residual,scale_dtype", [(64, True, "float32"), (40, False, "float32"),
                                                    (64, False, "float16")])  # 64: 4 row blocks per task; 40: one
def test_row_tiled_q4_kernel_matches_numpy(layout, n, residual, scale_dtype):
    """The batch-tiled kernel for every row count branch (1 row, tile 4 with clamped tail, tile 8 with tail)."""
    k = 96
    rng = np.random.default_rng(n)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), scale_dtype)
    wd = dequantize_q4(q, s, k).astype(np.float64)
    func = cpu_gemv.tiled_kernel(n, k, layout, residual, scale_dtype=scale_dtype)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target.from_device(tvm.cpu()))
    dev = tvm.cpu()
    for rows in ([1] if layout == "11" else [1, 2, 3, 4, 5, 8, 9, 13, 20]):
        shape = (rows, 1) if layout == "b1" else (1, rows)
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        res = rng.standard_normal((*shape, n)).astype(np.float32)
        expected = x.astype(np.float64) @ wd.T + (res if residual else 0)
        args = [tvm.runtime.tensor(a, dev) for a in ([q, s, x] + ([res] if residual else []))]
        out = tvm.runtime.tensor(np.full((*shape, n), np.nan, np.float32), dev)
        lib["main"](*args, out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4, err_msg=f"rows={rows}")


def test_row_tiled_kernel_replaces_only_the_stock_q4_form():
    stock = cpu_gemv.stock_kernel(64, 64, "b1", True)
    tiled = cpu_gemv.replace_q4_matmul(stock)
    assert tiled is not None and tiled.attrs[cpu_gemv.KERNEL_ATTR] == "q4_row_tiled"
    # Same shapes, another dequantize formula (zero point 8): not ours, keeps the rfactor schedule.
    other = parse(cpu_gemv.stock_source(64, 64, "b1", False).replace("T.float32(7.0)", "T.float32(8.0)"))
    assert cpu_gemv._signature(other) == (64, 64, "b1", False)
    assert cpu_gemv.replace_q4_matmul(other) is None
    assert cpu_gemv.replace_q4_matmul(cpu_gemv.stock_kernel(64, 64, "b1", False)) is not None
    assert cpu_gemv.replace_q4_matmul(_kernel(64, 64, False)) is None  # int32 shapes: not what our models produce


@pytest.mark.parametrize("layout", ["b1", "1s", "11"])
@pytest.mark.parametrize("n,k,residual,scale_dtype", [(64, 96, True, "float32"), (192, 64, False, "float32"),
                                                      (128, 96, True, "float16")])
def test_blocked_q4_kernel_matches_numpy(layout, n, k, residual, scale_dtype):
    """The 64-row-blocked kernel (q4f32_cpu; float16 scales: q4f32_cpu_f16scale) for one row, for row tiles with a
    clamped tail, and (from PANEL_MIN rows) for the panel GEMM: chunks of PANEL_CHUNK rows, a last chunk of 1 row,
    tiles with a clamped tail."""
    rng = np.random.default_rng(n + k)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32) * 3, scale_dtype)
    assert s.dtype == scale_dtype
    wd = dequantize_q4(q, s, k).astype(np.float64)
    func = cpu_q4_blocked.blocked_kernel(n, k, layout, residual, scale_dtype=scale_dtype)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target.from_device(tvm.cpu()))
    dev = tvm.cpu()
    panel = [cpu_q4_blocked.PANEL_MIN + d for d in (-1, 0, 1)] + [cpu_q4_blocked.PANEL_CHUNK + d for d in (-1, 0, 1)]
    for rows in ([1] if layout == "11" else [1, 2, 3, 4, 5, 8, 9, 13, *panel, 100, 3 * cpu_q4_blocked.PANEL_CHUNK + 1]):
        shape = (rows, 1) if layout == "b1" else (1, rows)
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        res = rng.standard_normal((*shape, n)).astype(np.float32)
        expected = x.astype(np.float64) @ wd.T + (res if residual else 0)
        args = [tvm.runtime.tensor(a, dev) for a in ([block_rows(q), block_rows(s), x] + ([res] if residual else []))]
        out = tvm.runtime.tensor(np.full((*shape, n), np.nan, np.float32), dev)
        lib["main"](*args, out)
        np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4, err_msg=f"rows={rows}")


_HOST = tvm.target.Target.from_device(tvm.cpu())


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


@pytest.mark.amx
@pytest.mark.parametrize("layout", ["b1", "1s"])
@pytest.mark.parametrize("n,k,residual,scale_dtype", [(64, 96, True, "float32"), (192, 64, False, "float32"),
                                                      (128, 96, False, "float16")])
def test_blocked_q4_kernel_on_amx_tiles(layout, n, k, residual, scale_dtype):
    """From PANEL_MIN rows on an AMX CPU: x as bf16 hi + lo times the integer weights, two tile products per group,
    scaled per group in float32. Rows: one tile, clamped tails, several chunks of AMX_CHUNK_ROWS rows.
    Checked against float64 on x cut to its two bfloat16 parts (tight: only float32 sums differ; the weights are
    exact), and near float32 on the exact x; not the float32 panel's result (so the tile path ran: the kernel falls
    back to the panel if Linux refuses AMX)."""
    rng = np.random.default_rng(n + k + 1)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32) * 3, scale_dtype)
    wd = dequantize_q4(q, s, k).astype(np.float64)
    libs = [tvm.compile(tvm.IRModule({"main": cpu_q4_blocked.blocked_kernel(
        n, k, layout, residual, amx=amx, scale_dtype=scale_dtype).with_attr("global_symbol", "main")}), target=_HOST)
        for amx in (True, False)]
    dev = tvm.cpu()
    for rows in [16, 17, 29, 100, 2 * cpu_q4_blocked.AMX_CHUNK_ROWS + 1]:
        shape = (rows, 1) if layout == "b1" else (1, rows)
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        res = rng.standard_normal((*shape, n)).astype(np.float32)
        expected = x.astype(np.float64) @ wd.T + (res if residual else 0)
        x_hi = _bf16(x)
        x16 = x_hi.astype(np.float64) + _bf16(x - x_hi)
        split = x16 @ wd.T + (res if residual else 0)
        args = [tvm.runtime.tensor(a, dev) for a in ([block_rows(q), block_rows(s), x] + ([res] if residual else []))]
        outs = []
        for lib in libs:
            out = tvm.runtime.tensor(np.full((*shape, n), np.nan, np.float32), dev)
            lib["main"](*args, out)
            outs.append(out.numpy())
        scale = np.abs(expected).max()
        np.testing.assert_allclose(outs[0], split, rtol=0, atol=1e-6 * scale, err_msg=f"rows={rows}")
        np.testing.assert_allclose(outs[0], expected, rtol=0, atol=1e-5 * scale, err_msg=f"rows={rows}")
        assert np.any(outs[0] != outs[1]), f"rows={rows}: the AMX kernel gave the float32 panel's result"


@pytest.mark.amx
@pytest.mark.parametrize("layout", ["b1", "1s"])
@pytest.mark.parametrize("n,k,residual", [(64, 96, True), (192, 64, False)])
def test_blocked_q4_kernel_in_bf16_precision(layout, n, k, residual):
    """precision="bf16": one tile product of x and w each rounded to the nearest bfloat16, summed in float32. Checked
    against float64 on the rounded inputs (tight: only the float32 sums differ), which the float32 result misses
    (the rounding is what the bound sees); rows below PANEL_MIN keep the float32 kernels."""
    rng = np.random.default_rng(n + k + 2)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32) * 3, "float32")
    wd = dequantize_q4(q, s, k)
    lib = tvm.compile(tvm.IRModule({"main": cpu_q4_blocked.blocked_kernel(n, k, layout, residual, amx=True,
                                                                          precision="bf16")
                                    .with_attr("global_symbol", "main")}), target=_HOST)
    dev = tvm.cpu()
    for rows in [8, 16, 17, 2 * cpu_q4_blocked.AMX_CHUNK_ROWS + 1]:
        shape = (rows, 1) if layout == "b1" else (1, rows)
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        res = rng.standard_normal((*shape, n)).astype(np.float32)
        exact = x.astype(np.float64) @ wd.astype(np.float64).T + (res if residual else 0)
        rounded = _bf16(x).astype(np.float64) @ _bf16(wd).astype(np.float64).T + (res if residual else 0)
        args = [tvm.runtime.tensor(a, dev) for a in ([block_rows(q), block_rows(s), x] + ([res] if residual else []))]
        out = tvm.runtime.tensor(np.full((*shape, n), np.nan, np.float32), dev)
        lib["main"](*args, out)
        bound = 1e-5 * np.abs(exact).max()
        if rows < cpu_q4_blocked.PANEL_MIN:
            np.testing.assert_allclose(out.numpy(), exact, rtol=0, atol=bound, err_msg=f"rows={rows}")
        else:
            np.testing.assert_allclose(out.numpy(), rounded, rtol=0, atol=bound, err_msg=f"rows={rows}")
            assert np.abs(out.numpy() - exact).max() > 10 * bound, f"rows={rows}: not rounded to bf16"


@pytest.mark.parametrize("amx,precision,scale_dtype", [
    (False, "f32", "float32"), (False, "f32", "float16"), pytest.param(True, "f32", "float32", marks=pytest.mark.amx),
    pytest.param(True, "f32", "float16", marks=pytest.mark.amx),
    pytest.param(True, "bf16", "float32", marks=pytest.mark.amx)])
@pytest.mark.parametrize("layout", ["1s", "b1"])
def test_fused_gate_up_silu_kernel(amx, precision, scale_dtype, layout):
    """gate_up (N = 2I: gate rows, then up rows) and silu(gate) * up in one kernel: against float64 on the same
    weights (f32: within the AMX kernel's error; bf16: within bf16 rounding), and against the two kernels it
    replaces (the blocked GEMM, then the activation kernel) — every path: GEMV rows below PANEL_MIN, the AMX epilogue
    (or the panel without AMX), 14-row tails, two row chunks."""
    from mlc_llm.compiler import cpu_activation
    n, k = 256, 96
    rng = np.random.default_rng(11)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), scale_dtype)
    wd = dequantize_q4(q, s, k).astype(np.float64)
    build = lambda f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),  # noqa: E731
                                  target=_HOST)["main"]
    fused = build(cpu_q4_blocked.fused_silu_kernel(n, k, layout, amx=amx, precision=precision,
                                                   scale_dtype=scale_dtype))
    gemm = build(cpu_q4_blocked.blocked_kernel(n, k, layout, False, amx=amx, precision=precision,
                                               scale_dtype=scale_dtype))
    act = build(cpu_activation.silu_mul_kernel(n // 2, "float32"))
    for rows in [1, 5, 16, 29, 2 * cpu_q4_blocked.AMX_CHUNK_ROWS + 1]:
        shape = (rows, 1) if layout == "b1" else (1, rows)
        x = rng.standard_normal((*shape, k)).astype(np.float32)
        args = [tvm.runtime.tensor(a) for a in (block_rows(q), block_rows(s), x)]
        out = tvm.runtime.tensor(np.full((*shape, n // 2), np.nan, np.float32))
        fused(*args, out)
        y = out.numpy().reshape(rows, n // 2)
        gu = tvm.runtime.tensor(np.full((*shape, n), np.nan, np.float32))
        gemm(*args, gu)
        two = tvm.runtime.tensor(np.full((1, rows, n // 2), np.nan, np.float32))
        act(tvm.runtime.tensor(gu.numpy().reshape(1, rows, n)), two)
        h = x.reshape(rows, k).astype(np.float64) @ wd.T
        expected = h[:, :n // 2] / (1 + np.exp(-h[:, :n // 2])) * h[:, n // 2:]
        scale = np.abs(expected).max()
        bf16 = precision == "bf16" and amx and rows >= cpu_q4_blocked.PANEL_MIN
        np.testing.assert_allclose(y, expected, rtol=0, atol=(2e-2 if bf16 else 1e-5) * scale, err_msg=f"rows={rows}")
        np.testing.assert_allclose(y, two.numpy().reshape(rows, n // 2), rtol=0, atol=1e-6 * scale,
                                   err_msg=f"rows={rows}")


@pytest.mark.amx
def test_prefill_calls_the_fused_gate_up_silu_kernel(tmp_path):
    """On AMX targets the prefill functions call one fused gate_up + activation kernel per layer (the GEMM's
    [rows, 2I] output is never materialized); decode keeps the GEMM and the activation kernel."""
    from mlc_llm.steps.compile import optimized_module
    from mlc_llm.steps.gen_config import gen_config

    write_tiny_hf(tmp_path / "hf")
    gen_config(str(tmp_path / "hf"), "q4f32_cpu", "chatml", tmp_path / "out")
    mod, _ = optimized_module(tmp_path / "out", "cpu", {"intermediate_size": 128})  # gate, up: whole 64-row blocks
    fused = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
             and f.attrs.get(cpu_gemv.KERNEL_ATTR) == "q4_blocked64_silu"]
    assert len(fused) == 1, fused
    for fn, n_fused, n_act in [("prefill", 2, 0), ("batch_prefill", 2, 0), ("batch_decode", 0, 2)]:
        text = mod[fn].script()
        assert text.count(f"R.call_tir({fused[0]},") == n_fused, fn
        assert text.count("R.call_tir(silu_mul_cpu,") == n_act, fn


def test_unknown_prefill_precision_is_refused():
    with pytest.raises(ValueError, match="unknown prefill precision 'fp8'"):
        cpu_q4_blocked.blocked_kernel(128, 64, "1s", False, amx=True, precision="fp8")
    from mlc_llm.compiler.cpu_schedules import schedule_cpu_matmuls
    with pytest.raises(ValueError, match="allowed: f32, bf16"):
        schedule_cpu_matmuls(_HOST, "fp16")


@pytest.mark.amx
def test_amx_kernel_falls_back_to_the_float32_panel_when_linux_refuses_amx(monkeypatch):
    """The AMX kernel asks Linux for the tile state at each call; refused (here: the same syscall with an invalid
    number, which fails), it must run the float32 panel GEMM: the panel kernel's result, bit for bit."""
    n, k, rows = 128, 64, 40
    rng = np.random.default_rng(7)
    q, s = quantize_q4(rng.standard_normal((n, k)).astype(np.float32), "float32")
    from mlc_llm.compiler.cpu import amx

    monkeypatch.setattr(amx, "SYS_ARCH_PRCTL", -1)  # built with an invalid syscall number
    refused = cpu_q4_blocked.blocked_kernel(n, k, "1s", False, amx=True)
    assert '"syscall", T.int64(-1)' in refused.script()
    funcs = [refused, cpu_q4_blocked.blocked_kernel(n, k, "1s", False)]
    x = rng.standard_normal((1, rows, k)).astype(np.float32)
    outs = []
    for f in funcs:
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=_HOST)
        out = tvm.runtime.tensor(np.full((1, rows, n), np.nan, np.float32))
        lib["main"](*[tvm.runtime.tensor(a) for a in (block_rows(q), block_rows(s), x)], out)
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_blocked_kernel_replaces_only_the_stock_blocked_form():
    stock = cpu_q4_blocked.stock_kernel(128, 64, "1s", True)
    assert cpu_q4_blocked.replace_blocked_q4_matmul(stock).attrs[cpu_gemv.KERNEL_ATTR] == "q4_blocked64"
    other = parse(cpu_q4_blocked.stock_source(128, 64, "1s", True).replace("T.float32(7.0)", "T.float32(8.0)"))
    assert cpu_gemv._signature(other, cpu_q4_blocked.BLOCK) == (128, 64, "1s", True)
    assert cpu_q4_blocked.replace_blocked_q4_matmul(other) is None
    # the NK stock form is not the blocked one, and the other way round
    assert cpu_q4_blocked.replace_blocked_q4_matmul(cpu_gemv.stock_kernel(128, 64, "1s", True)) is None
    assert cpu_gemv.replace_q4_matmul(stock) is None


def test_block_rows_round_trip():
    from mlc_llm.quantization.scheme import unblock_rows

    a = np.arange(128 * 3, dtype=np.uint32).reshape(128, 3)
    b = block_rows(a)
    assert b.shape == (2, 3, 64) and b[1, 2, 5] == a[64 + 5, 2]
    assert np.array_equal(unblock_rows(b), a)
    with pytest.raises(ValueError, match="multiple of the block"):
        block_rows(a[:100])


def test_blocked_quantization_is_refused_for_gpu_targets(tmp_path):
    from mlc_llm.steps.compile import CompileError, optimized_module
    from mlc_llm.steps.gen_config import gen_config

    write_tiny_hf(tmp_path / "hf")
    gen_config(str(tmp_path / "hf"), "q4f32_cpu", "chatml", tmp_path / "out")
    with pytest.raises(CompileError, match="row-blocked layout of the CPU kernels; use q4f16_1"):
        optimized_module(tmp_path / "out", "cuda")
