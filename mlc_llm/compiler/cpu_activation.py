"""CPU kernels for the gated MLP activation `silu(gate) * up` (or `gelu_tanh(gate) * up`, Gemma) on the fused
gate_up output, and for RMSNorm.

TVM lowers `silu` to a scalar `expf` library call per element (~10 % of a 128-token prefill). Here rows (tokens) run in
parallel and 16 elements at a time use the vectorized polynomial 2^x of `cpu_attention` (relative error < 2e-7): silu(g)
= g / (1 + 2^(-g log2 e)), the exponent clamped to 126 (below g = -87 silu is 0 to f32 precision anyway). The model
calls it through `op.tensor_ir_op` on CPU targets (opaque to fusion; the stock split + silu + multiply was one fused
kernel as well).

TVM's legalized `rms_norm` is serial and scalar (1.3 ms for 512 tokens x 576 here, 61 calls per forward): ours runs
rows in parallel (serially below 4 rows, where waking the thread pool costs more than the row), sums squares in
16 lanes and scales 16 elements at a time; same formula, y = x * (1 / sqrt(mean(x^2) + eps)) * weight.
"""
from __future__ import annotations

import functools
import math

import tvm

from .cpu_attention import LOG2E, _exp2, _halve
from .cpu_gemv import _indent, _parse

_SILU_MUL = """
@T.prim_func(private=True, s_tir=True)
def main(x_h: T.handle, y_h: T.handle):
    T.func_attr({{"op_pattern": 8, "tirx.noalias": True}})
    b = T.int64()
    s = T.int64()
    x = T.match_buffer(x_h, (b, s, T.int64({two_i})), "{dtype}")
    y = T.match_buffer(y_h, (b, s, T.int64({i})), "{dtype}")
    with T.sblock("root"):
        for r in T.parallel(b * s):
            for c in range({chunks}):
                for l in T.vectorized(16):
                    y[r // s, r % s, c * 16 + l] = T.Cast("{dtype}", {act})
"""


def supported(intermediate: int) -> bool:
    return intermediate % 16 == 0


# The kernels are built once per shape (parsing the TVMScript takes ~0.1 s; a model asks for one per layer).
@functools.lru_cache(maxsize=None)
def silu_mul_kernel(intermediate: int, dtype: str, act: str = "silu") -> tvm.tirx.PrimFunc:
    """y[..., :I] = act(x[..., :I]) * x[..., I:] for x [b, s, 2I] (the gate_up projection's output); `act`: silu or
    gelu_tanh."""
    if not supported(intermediate):
        raise ValueError(f"intermediate size {intermediate} is not a multiple of 16")
    act = silu_mul_expr("x[r // s, r % s, c * 16 + l]", f"x[r // s, r % s, {intermediate} + c * 16 + l]", act)
    return _parse(_SILU_MUL.format(two_i=2 * intermediate, i=intermediate, chunks=intermediate // 16, dtype=dtype,
                                   act=act))


def silu_mul_expr(gate: str, up: str, act: str = "silu") -> str:
    """TIR text of act(gate) * up in float32 (the kernel above; also the epilogue of the fused gate_up kernel,
    `cpu_q4_blocked.fused_silu_kernel`). Both are g * sigmoid(z): silu z = g; gelu_tanh z = 2 u with
    u = sqrt(2/pi) (g + 0.044715 g^3), since 0.5 (1 + tanh(u)) = sigmoid(2 u)."""
    g = f'T.Cast("float32", {gate})'
    if act == "silu":
        z = g
    elif act == "gelu_tanh":
        z = f"(T.float32({2 * math.sqrt(2 / math.pi)!r}) * ({g} + T.float32(0.044715) * {g} * {g} * {g}))"
    else:
        raise ValueError(f"unknown activation '{act}'")
    exp = _exp2(f"T.min(-{z} * T.float32({LOG2E!r}), T.float32(126))")
    return f'{g} / (T.float32(1) + {exp}) * T.Cast("float32", {up})'


_RMS_NORM = """
@T.prim_func(private=True, s_tir=True)
def main(x_h: T.handle, w: T.Buffer((T.int64({h}),), "{dtype}"), y_h: T.handle):
    T.func_attr({{"op_pattern": 8, "tirx.noalias": True}})
    b = T.int64()
    s = T.int64()
    x = T.match_buffer(x_h, (b, s, T.int64({h})), "{dtype}")
    y = T.match_buffer(y_h, (b, s, T.int64({h})), "{dtype}")
    with T.sblock("root"):
        if b * s < T.int64(4):
            for r in range(b * s):
{row}
        else:
            for r in T.parallel(b * s):
{row}
"""

_RMS_ROW = """
acc = T.alloc_buffer((16,), "float32", scope="global")
for l in T.vectorized(16):
    acc[l] = T.float32(0)
for c in range({chunks}):
    for l in T.vectorized(16):
        acc[l] = acc[l] + T.Cast("float32", x[r // s, r % s, c * 16 + l]) * T.Cast("float32", x[r // s, r % s, c * 16 + l])
{total}
acc[0] = T.float32(1) / T.sqrt(acc[0] / T.float32({h}) + T.float32({eps!r}))
for c in range({chunks}):
    for l in T.vectorized(16):
        y[r // s, r % s, c * 16 + l] = T.Cast("{dtype}", T.Cast("float32", x[r // s, r % s, c * 16 + l]) * acc[0] * T.Cast("float32", w[c * 16 + l]))
"""


@functools.lru_cache(maxsize=None)
def rms_norm_kernel(hidden: int, eps: float, dtype: str) -> tvm.tirx.PrimFunc:
    """y = rms_norm(x) * w over the last axis of x [b, s, hidden] (hidden a multiple of 16: `supported`)."""
    if not supported(hidden):
        raise ValueError(f"hidden size {hidden} is not a multiple of 16")
    row = _RMS_ROW.format(chunks=hidden // 16, h=hidden, eps=float(eps), dtype=dtype,
                          total="\n".join(_halve("acc[T.ramp(0, 1, 16)]", "+", "total", out="acc[0]")))
    return _parse(_RMS_NORM.format(h=hidden, dtype=dtype, row=_indent(row, 4)))
