"""Vector math as TIR text: 2^x by exponent bits and a polynomial, a 16-lane horizontal reduction, and the gated
activations act(gate) * up. TVM lowers `exp` / `sigmoid` to a scalar library call per element; these stay in
vector registers."""
from __future__ import annotations

import math

# 2^f on [0, 1), degree 5, least squares on Chebyshev nodes: max relative error 1.8e-7
EXP2_POLY = (0.0018951086, 0.008946225, 0.0558632575, 0.2401407808, 0.693154633, 0.99999988)
LOG2E = math.log2(math.e)


def exp2(x: str) -> str:
    """2^x for x <= 0 as TIR text: 2^floor(x) from the exponent bits times a polynomial in the fraction. x is
    clamped at -125, so that masked scores (-1e30) give ~2e-38, not a denormal: a float operation that produces or
    reads a denormal takes a microcode assist (~100 cycles) on Intel CPUs."""
    xc = f"T.max({x}, T.float32(-125))"
    fl = f"T.floor({xc})"
    frac = f"({xc} - {fl})"
    poly = f"T.float32({EXP2_POLY[0]!r})"
    for c in EXP2_POLY[1:]:
        poly = f"({poly} * {frac} + T.float32({c!r}))"
    pow2 = f"T.reinterpret(\"float32\", T.shift_left(T.Cast(\"int32\", {fl}) + 127, 23))"
    return f"{pow2} * {poly}"


def halve(vec: str, op: str, name: str, out: str = "") -> list[str]:
    """TIR lines reducing the 16-lane vector expression `vec` to a scalar by halving (16 -> 8 -> 4 -> 2 -> 1 lanes,
    vectorlow/vectorhigh; the intermediates are `name`16, `name`8, ...), combining halves with `op` ("+" or "max");
    the scalar is bound to `name`, or stored to `out` if given."""
    comb = (lambda a, b: f"{a} + {b}") if op == "+" else (lambda a, b: f"T.max({a}, {b})")
    lines = [f"{name}16 = T.bind({vec})"]
    for lanes, prev in ((8, 16), (4, 8), (2, 4)):
        lines.append(f"{name}{lanes} = T.bind(" + comb(f"T.vectorlow(\"float32x{lanes}\", {name}{prev})",
                                                       f"T.vectorhigh(\"float32x{lanes}\", {name}{prev})") + ")")
    last = comb(f"T.vectorlow(\"float32\", {name}2)", f"T.vectorhigh(\"float32\", {name}2)")
    lines.append(f"{out} = {last}" if out else f"{name} = T.bind({last})")
    return lines


def silu_mul_expr(gate: str, up: str, act: str = "silu") -> str:
    """TIR text of act(gate) * up in float32 (the activation kernel; also the epilogue of the fused gate_up kernel).
    Both are g * sigmoid(z): silu z = g; gelu_tanh z = 2 u with u = sqrt(2/pi) (g + 0.044715 g^3), since
    0.5 (1 + tanh(u)) = sigmoid(2 u). The exponent is clamped at 126: below g = -87 silu is 0 to f32 precision."""
    g = f'T.Cast("float32", {gate})'
    if act == "silu":
        z = g
    elif act == "gelu_tanh":
        z = f"(T.float32({2 * math.sqrt(2 / math.pi)!r}) * ({g} + T.float32(0.044715) * {g} * {g} * {g}))"
    else:
        raise ValueError(f"unknown activation '{act}'")
    e = exp2(f"T.min(-{z} * T.float32({LOG2E!r}), T.float32(126))")
    return f'{g} / (T.float32(1) + {e}) * T.Cast("float32", {up})'
