"""CPU kernel for the gated MLP activation `silu(gate) * up` on the fused gate_up output.

TVM lowers `silu` to a scalar `expf` library call per element (the probe of ../shared/docs/CPU_KERNELS.md found it
~10 % of a 128-token prefill). Here rows (tokens) run in parallel and 16 elements at a time use the vectorized
polynomial 2^x of `cpu_attention` (relative error < 2e-7): silu(g) = g / (1 + 2^(-g log2 e)), the exponent clamped to
126 (below g = -87 silu is 0 to f32 precision anyway). The model calls it through `op.tensor_ir_op` on CPU targets
(opaque to fusion; the stock split + silu + multiply was one fused kernel as well).
"""
from __future__ import annotations

import tvm

from .cpu_attention import LOG2E, _exp2
from .cpu_gemv import _parse

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
                    y[r // s, r % s, c * 16 + l] = T.Cast("{dtype}", T.Cast("float32", x[r // s, r % s, c * 16 + l]) / (T.float32(1) + {exp}) * T.Cast("float32", x[r // s, r % s, {i} + c * 16 + l]))
"""


def supported(intermediate: int) -> bool:
    return intermediate % 16 == 0


def silu_mul_kernel(intermediate: int, dtype: str) -> tvm.tirx.PrimFunc:
    """y[..., :I] = silu(x[..., :I]) * x[..., I:] for x [b, s, 2I] (the gate_up projection's output)."""
    if not supported(intermediate):
        raise ValueError(f"intermediate size {intermediate} is not a multiple of 16")
    g = "T.Cast(\"float32\", x[r // s, r % s, c * 16 + l])"
    exp = _exp2(f"T.min(-{g} * T.float32({LOG2E!r}), T.float32(126))")
    return _parse(_SILU_MUL.format(two_i=2 * intermediate, i=intermediate, chunks=intermediate // 16, dtype=dtype,
                                   exp=exp))
