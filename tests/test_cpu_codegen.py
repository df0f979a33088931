"""How our CPU kernels lower on TVM 0.27 (the conventions in compiler/cpu_gemv.py, `_parse`): a scratch buffer of a
parallel task and a single-assignment scalar must not become a `TVMBackendAllocWorkspace` call (a workspace-pool
lookup and release per task, per 64-row block, per KV page). Scratch under 1 KB has to be a stack allocation."""
from __future__ import annotations

import re

import pytest
import tvm

from mlc_llm.compiler import cpu_activation, cpu_attention, cpu_gemv, cpu_q4_blocked
from mlc_llm.compiler.target import make_target

TARGET = make_target("cpu")
AMX = cpu_q4_blocked.has_amx(TARGET)

KERNELS = {
    "decode attention": lambda: cpu_attention.decode_kernel(9, 3, 64, "float32"),
    "ragged prefill attention": lambda: cpu_attention.ragged_prefill_kernel(9, 3, 64, "float32"),
    "ragged prefill attention, AMX": lambda: cpu_attention.ragged_prefill_kernel(9, 3, 64, "float32", amx=AMX),
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


def _workspace_sizes(func: tvm.tirx.PrimFunc) -> list[int]:
    """Constant byte sizes of the TVMBackendAllocWorkspace calls in the kernel's LLVM IR."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)
    ll = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("ll")
    return [int(n) for n in re.findall(r"call ptr %[\w.]+\(i32 1, i32 [^,]+, i64 (\d+), i32", ll)]


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
    assert sorted(_workspace_sizes(cpu_gemv._parse(src))) == [4, 256]


@pytest.mark.parametrize("name", list(KERNELS))
def test_small_scratch_stays_on_the_stack(name):
    small = [n for n in _workspace_sizes(KERNELS[name]()) if n < 1024]
    assert not small, f"{name}: workspace-pool allocations of {small} bytes (mutable scalar or 'local' buffer)"
