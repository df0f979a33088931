"""CPU kernels for the gated MLP activation `silu(gate) * up` (or `gelu_tanh(gate) * up`, Gemma) on the fused
gate_up output, and for RMSNorm.

TVM lowers `silu` to a scalar `expf` library call per element. Here rows (tokens) run in parallel and 16 elements at
a time use the vectorized polynomial 2^x of `cpu/vecmath.py` (relative error < 2e-7): silu(g) = g / (1 + 2^(-g log2 e)).
The model calls it through `op.tensor_ir_op` on CPU targets (opaque to fusion; the stock split + silu + multiply was one
fused kernel as well).

TVM's legalized `rms_norm` is serial and scalar: ours runs rows in parallel, sums squares in 16 lanes and scales 16
elements at a time; same formula, y = x * (1 / sqrt(mean(x^2) + eps)) * weight. Both are `@T.prim_func` closures.
"""
from __future__ import annotations

import functools

import tvm
from tvm.script import tirx as T

from .cpu.tasks import SERIAL_ROWS
from .cpu.vecmath import halve, silu_mul


def supported(intermediate: int) -> bool:
    return intermediate % 16 == 0


# The kernels are built once per shape (building one takes ~0.1 s; a model asks for one per layer).
@functools.lru_cache(maxsize=None)
def silu_mul_kernel(intermediate: int, dtype: str, act: str = "silu") -> tvm.tirx.PrimFunc:
    """y[..., :I] = act(x[..., :I]) * x[..., I:] for x [b, s, 2I] (the gate_up projection's output); `act`: silu or
    gelu_tanh."""
    if not supported(intermediate):
        raise ValueError(f"intermediate size {intermediate} is not a multiple of 16")
    chunks = intermediate // 16

    @T.macro
    def row(x, y, r, s):
        for c in range(chunks):
            for l in T.vectorized(16):
                y[r // s, r % s, c * 16 + l] = T.Cast(dtype, silu_mul(
                    x[r // s, r % s, c * 16 + l], x[r // s, r % s, intermediate + c * 16 + l], act))

    @T.prim_func(private=True, s_tir=True)
    def main(x_h: T.handle, y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_h, (b, s, T.int64(2 * intermediate)), dtype)
        y = T.match_buffer(y_h, (b, s, T.int64(intermediate)), dtype)
        with T.sblock("root"):
            if b * s < T.int64(SERIAL_ROWS):
                for r in range(b * s):
                    row(x, y, r, s)
            else:
                for r in T.parallel(b * s):
                    row(x, y, r, s)

    return main


@functools.lru_cache(maxsize=None)
def rms_norm_kernel(hidden: int, eps: float, dtype: str) -> tvm.tirx.PrimFunc:
    """y = rms_norm(x) * w over the last axis of x [b, s, hidden] (hidden a multiple of 16: `supported`)."""
    if not supported(hidden):
        raise ValueError(f"hidden size {hidden} is not a multiple of 16")
    chunks, eps = hidden // 16, float(eps)

    @T.macro
    def row(x, w, y, r, s):
        acc = T.alloc_buffer((16,), "float32", scope="global")  # a stack slot (compiler/cpu/text.py)
        for l in T.vectorized(16):
            acc[l] = T.float32(0)
        for c in range(chunks):
            for l in T.vectorized(16):
                acc[l] = acc[l] + T.Cast("float32", x[r // s, r % s, c * 16 + l]) * \
                    T.Cast("float32", x[r // s, r % s, c * 16 + l])
        halve(acc[T.ramp(0, 1, 16)], "+", acc, (0,))  # acc[0] = the sum of the 16 lanes
        acc[0] = T.float32(1) / T.sqrt(acc[0] / T.float32(hidden) + T.float32(eps))
        for c in range(chunks):
            for l in T.vectorized(16):
                y[r // s, r % s, c * 16 + l] = T.Cast(dtype, T.Cast("float32", x[r // s, r % s, c * 16 + l]) *
                                                      acc[0] * T.Cast("float32", w[c * 16 + l]))

    @T.prim_func(private=True, s_tir=True)
    def main(x_h: T.handle, w: T.Buffer((T.int64(hidden),), dtype), y_h: T.handle):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_h, (b, s, T.int64(hidden)), dtype)
        y = T.match_buffer(y_h, (b, s, T.int64(hidden)), dtype)
        with T.sblock("root"):
            if b * s < T.int64(SERIAL_ROWS):
                for r in range(b * s):
                    row(x, w, y, r, s)
            else:
                for r in T.parallel(b * s):
                    row(x, w, y, r, s)

    return main
