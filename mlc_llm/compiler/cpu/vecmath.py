"""Vector math: 2^x by exponent bits and a polynomial, the gated activations act(gate) * up, and a cache prefetch as
TIR expression builders called from `@T.prim_func` kernels, and a 16-lane horizontal reduction as a `@T.macro`. TVM
lowers `exp` / `sigmoid` to a scalar library call per element; these stay in vector registers."""
from __future__ import annotations

import math

from tvm.ir.expr import Expr
from tvm.script import tirx as T

# 2^f on [0, 1), degree 5, least squares on Chebyshev nodes: max relative error 1.8e-7
EXP2_POLY = (0.0018951086, 0.008946225, 0.0558632575, 0.2401407808, 0.693154633, 0.99999988)
LOG2E = math.log2(math.e)


def exp2(x: Expr) -> Expr:
    """2^x for x <= 0: 2^floor(x) from the exponent bits times a polynomial in the fraction. x is clamped at -125, so
    that masked scores (-1e30) give ~2e-38, not a denormal: a float operation that produces or reads a denormal takes
    a microcode assist (~100 cycles) on Intel CPUs."""
    xc = T.max(x, T.float32(-125))
    fl = T.floor(xc)
    frac = xc - fl
    poly = T.float32(EXP2_POLY[0])
    for c in EXP2_POLY[1:]:
        poly = poly * frac + T.float32(c)
    return T.reinterpret("float32", T.shift_left(T.Cast("int32", fl) + 127, 23)) * poly


def _combine(op: str, a: Expr, b: Expr) -> Expr:
    return a + b if op == "+" else T.max(a, b)


@T.macro
def halve(vec, op, out, index):
    """out[index] = the 16 lanes of float32x16 `vec` combined by `op` ("+" or "max"), by halving: 16 -> 8 -> 4 -> 2
    -> 1 lanes (vectorlow / vectorhigh: 4 extract + combine steps; reducing through a buffer reloads halves just after
    a full-vector store, which fails store forwarding)."""
    v16 = T.bind(vec)
    v8 = T.bind(_combine(op, T.vectorlow("float32x8", v16), T.vectorhigh("float32x8", v16)))
    v4 = T.bind(_combine(op, T.vectorlow("float32x4", v8), T.vectorhigh("float32x4", v8)))
    v2 = T.bind(_combine(op, T.vectorlow("float32x2", v4), T.vectorhigh("float32x2", v4)))
    out[index] = _combine(op, T.vectorlow("float32", v2), T.vectorhigh("float32", v2))


def silu_mul(gate: Expr, up: Expr, act: str = "silu") -> Expr:
    """act(gate) * up in float32 (the activation kernel; also the epilogue of the fused gate_up kernel). Both are
    g * sigmoid(z): silu z = g; gelu_tanh z = 2 u with u = sqrt(2/pi) (g + 0.044715 g^3), since
    0.5 (1 + tanh(u)) = sigmoid(2 u). The exponent is clamped at 126: below g = -87 silu is 0 to f32 precision."""
    g = T.Cast("float32", gate)
    if act == "silu":
        z = g
    elif act == "gelu_tanh":
        z = T.float32(2 * math.sqrt(2 / math.pi)) * (g + T.float32(0.044715) * g * g * g)
    else:
        raise ValueError(f"unknown activation '{act}'")
    return g / (T.float32(1) + exp2(T.min(-z * T.float32(LOG2E), T.float32(126)))) * T.Cast("float32", up)


def as_f32(value: Expr, dtype: str) -> Expr:
    """`value` of `dtype` as float32: a weight scale, widened where float16 (q4f32_cpu_f16scale)."""
    return value if dtype == "float32" else T.Cast("float32", value)


def cache_prefetch(element: Expr) -> Expr:
    """Prefetch the cache line of `element` (a buffer element, e.g. `qw[i, j]`) into all cache levels, a statement:
    `T.evaluate(cache_prefetch(...))`. A hint: an address past the end of the buffer does not fault."""
    return T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(element), T.int32(0), T.int32(3), T.int32(1))

