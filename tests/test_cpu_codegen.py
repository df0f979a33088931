"""How our CPU kernels lower on TVM 0.27 (the conventions in compiler/cpu/text.py, `parse`): a scratch buffer of a
parallel task and a single-assignment scalar must not become a `TVMBackendAllocWorkspace` call (a workspace-pool
lookup and release per task, per 64-row block, per KV page). Scratch under 1 KB has to be a stack allocation."""
from __future__ import annotations

import re

import pytest
import tvm

from mlc_llm.compiler import cpu_activation, cpu_attention, cpu_gemv, cpu_q4_blocked
from mlc_llm.compiler.cpu.amx import has_amx
from mlc_llm.compiler.cpu.text import parse
from mlc_llm.compiler.target import make_target

TARGET = make_target("cpu")
AMX = has_amx(TARGET)

KERNELS = {
    "decode attention": lambda: cpu_attention.decode_kernel(9, 3, 64, "float32"),
    "ragged prefill attention": lambda: cpu_attention.ragged_prefill_kernel(9, 3, 64, "float32"),
    "paged prefill attention": lambda: cpu_attention.paged_prefill_kernel(9, 3, 64, "float32"),
    "rope": lambda: cpu_attention.rope_kernel(9, 3, 64, "float32", 10000.0),
    "blocked q4 (+ residual)": lambda: cpu_q4_blocked.blocked_kernel(576, 1536, "1s", True, amx=AMX),
    "blocked q4, bf16 prefill": lambda: cpu_q4_blocked.blocked_kernel(3072, 576, "1s", False, amx=AMX,
                                                                      precision="bf16"),
    "blocked q4 gate_up + silu": lambda: cpu_q4_blocked.fused_silu_kernel(3072, 576, "1s", amx=AMX),
    "row-tiled q4": lambda: cpu_gemv.tiled_kernel(1536, 576, "1s", True),
    "rms norm": lambda: cpu_activation.rms_norm_kernel(576, 1e-5, "float32"),
    "silu * up": lambda: cpu_activation.silu_mul_kernel(1536, "float32"),
}


# The AMX variants (the default on Sapphire Rapids and later) compile for this target on any host: code generation
# only, nothing runs, so a host without AMX still checks them.
AMX_TARGET = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": "sapphirerapids"})
AMX_KERNELS = {
    "ragged prefill attention": lambda amx: cpu_attention.ragged_prefill_kernel(9, 3, 64, "float32", amx=amx),
    "blocked q4 (+ residual)": lambda amx: cpu_q4_blocked.blocked_kernel(576, 1536, "1s", True, amx=amx),
    "blocked q4, bf16 prefill": lambda amx: cpu_q4_blocked.blocked_kernel(3072, 576, "1s", False, amx=amx,
                                                                          precision="bf16"),
    "blocked q4 gate_up + silu": lambda amx: cpu_q4_blocked.fused_silu_kernel(3072, 576, "1s", amx=amx),
    "blocked q4, float16 scales": lambda amx: cpu_q4_blocked.blocked_kernel(576, 1536, "1s", True, amx=amx,
                                                                            scale_dtype="float16"),
    "blocked q4 gate_up + silu, float16 scales": lambda amx: cpu_q4_blocked.fused_silu_kernel(
        3072, 576, "1s", amx=amx, scale_dtype="float16"),
}
TILE_OPS = {"tdpbf16ps", "tileloadd64", "tilestored64", "tilerelease"}


def _llvm_ir(func: tvm.tirx.PrimFunc, target: tvm.target.Target = TARGET) -> str:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return (lib.mod if hasattr(lib, "mod") else lib).inspect_source("ll")


def _workspace_sizes(func: tvm.tirx.PrimFunc, target: tvm.target.Target = TARGET) -> list[int]:
    """Constant byte sizes of the TVMBackendAllocWorkspace calls in the kernel's LLVM IR."""
    return [int(n) for n in re.findall(r"call ptr %[\w.]+\(i32 1, i32 [^,]+, i64 (\d+), i32", _llvm_ir(func, target))]


def test_the_probe_sees_a_mutable_scalar_and_a_local_buffer():
    """The pattern this file forbids, written the way TVM 0.27 turns into workspace calls (so the check can fail)."""
    src = '''
@T.prim_func(s_tir=True)
def main(x: T.Buffer((8, 64), "float32"), y: T.Buffer((8, 64), "float32")):
    for i in T.parallel(8):
        b = (i + 1) % 8
        acc = T.alloc_buffer((64,), "float32", scope="local")
        for l in T.vectorized(64):
            acc[l] = x[b, l] * T.float32(2)
        for l in T.vectorized(64):
            y[i, l] = acc[l]
'''
    assert sorted(_workspace_sizes(parse(src))) == [4, 256]


@pytest.mark.parametrize("name", list(KERNELS))
def test_small_scratch_stays_on_the_stack(name):
    small = [n for n in _workspace_sizes(KERNELS[name]()) if n < 1024]
    assert not small, f"{name}: workspace-pool allocations of {small} bytes (mutable scalar or 'local' buffer)"


def test_the_amx_target_is_one():
    assert has_amx(AMX_TARGET)


@pytest.mark.parametrize("name", list(AMX_KERNELS))
def test_amx_variants_compile_to_tile_instructions_on_any_host(name):
    ll = _llvm_ir(AMX_KERNELS[name](True), AMX_TARGET)
    assert TILE_OPS <= set(re.findall(r"llvm\.x86\.(t\w+)\(", ll)), f"{name}: no AMX tile code"
    small = [int(n) for n in re.findall(r"call ptr %[\w.]+\(i32 1, i32 [^,]+, i64 (\d+), i32", ll) if int(n) < 1024]
    assert not small, f"{name}, AMX: workspace-pool allocations of {small} bytes"
    # the same kernel's vector variant for the same target has none: the check above can fail
    assert not TILE_OPS & set(re.findall(r"llvm\.x86\.(t\w+)\(", _llvm_ir(AMX_KERNELS[name](False), AMX_TARGET)))


def test_int8_decode_gemv_compiles_to_vnni_on_any_host():
    """The `decode_precision: int8` GEMV for a CPU with AVX512-VNNI (the Sapphire Rapids target above has it): the
    dot products are `vpdpbusd` instructions, and its per-task scratch stays off the workspace pool."""
    from mlc_llm.compiler import cpu_q4_int8

    assert cpu_q4_int8.supported(AMX_TARGET)
    assert not cpu_q4_int8.supported(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu",
                                                        "mcpu": "skylake-avx512"}))
    for residual in (False, True, cpu_gemv.BIAS):
        func = cpu_q4_int8.gemv_kernel(1152, 896, "b1", residual).with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), target=AMX_TARGET)
        mod = lib.mod if hasattr(lib, "mod") else lib
        asm = mod.inspect_source("asm")
        assert len(re.findall(r"\bvpdpbusd\b", asm)) >= 8, residual
        small = [int(n) for n in re.findall(r"call ptr %[\w.]+\(i32 1, i32 [^,]+, i64 (\d+), i32",
                                            mod.inspect_source("ll")) if int(n) < 1024]
        assert not small, f"int8 GEMV: workspace-pool allocations of {small} bytes"
