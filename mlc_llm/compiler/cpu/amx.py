"""AMX-BF16 (Sapphire Rapids and later): which targets have it, the tile-state request, the tile configuration, and
float32 split into bfloat16 parts for the tile products, as TIR builders (expressions and a macro) that
`@T.prim_func` kernels call. Tile numbers and the configuration bytes must be constant immediates of the intrinsics:
a kernel writes one call per tile number."""
from __future__ import annotations

import tvm
from tvm.ir.expr import Expr
from tvm.script import tirx as T

AMX_CPUS = ("sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids")
SYS_ARCH_PRCTL = 158  # x86-64 Linux


def has_amx(target: tvm.target.Target) -> bool:
    """Whether code for `target` may use AMX-BF16 tiles (and AVX512-BF16, which every AMX CPU has: the AMX GEMM
    converts x with it)."""
    if target.kind.name != "llvm":
        return False
    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    return str(target.attrs.get("mcpu", "")) in AMX_CPUS or all(f in mattr for f in ("+amx-bf16", "+amx-tile",
                                                                                      "+avx512bf16"))


def request_amx() -> Expr:
    """Linux hands out the AMX tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), 0
    when granted. Our AMX kernels make it at each call and take their non-AMX path when refused."""
    return T.call_extern("int64", "syscall", T.int64(SYS_ARCH_PRCTL), T.int64(4131), T.int64(18))


def amx_op(name: str, *args) -> Expr:
    """The x86 intrinsic `llvm.x86.<name>` (tileloadd64, tdpbf16ps, ...), a statement: `T.evaluate(amx_op(...))`."""
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


@T.macro
def tile_config(rows=(16,) * 8):
    """Load the tile configuration our kernels use: palette 1, tiles 0-7 of 64 bytes x `rows[t]` rows."""
    cfg = T.alloc_buffer((64,), "uint8", scope="global")
    for i in range(64):
        cfg[i] = T.uint8(0)
    cfg[0] = T.uint8(1)
    for t in range(8):
        cfg[16 + 2 * t] = T.uint8(64)
    cfg[48] = T.uint8(rows[0])
    cfg[49] = T.uint8(rows[1])
    cfg[50] = T.uint8(rows[2])
    cfg[51] = T.uint8(rows[3])
    cfg[52] = T.uint8(rows[4])
    cfg[53] = T.uint8(rows[5])
    cfg[54] = T.uint8(rows[6])
    cfg[55] = T.uint8(rows[7])
    T.evaluate(amx_op("ldtilecfg", T.address_of(cfg[0])))


def round_bf16(value: Expr) -> Expr:
    """uint32 bits of float32 `value` rounded to the nearest bfloat16 (ties to even), in the upper 16 bits."""
    u = T.reinterpret("uint32", value)
    return T.bitwise_and(u + T.uint32(32767) + T.bitwise_and(T.shift_right(u, T.uint32(16)), T.uint32(1)),
                         T.uint32(0xFFFF0000))


def bf16x32(lo: Expr, hi: Expr) -> Expr:
    """The uint16x32 bfloat16 bits of two float32x16 values (`lo` in lanes 0-15, `hi` in 16-31), rounded to nearest
    even as `round_bf16`: one AVX512-BF16 instruction (vcvtne2ps2bf16) for 32 values instead of ~7 integer
    operations per 16 and a pack."""
    return T.reinterpret("uint16x32", T.call_llvm_pure_intrin("bfloat16x32", "llvm.x86.avx512bf16.cvtne2ps2bf16.512",
                                                              hi, lo))


def bf16_parts(x: Expr, y: Expr = None, tiny: bool = False) -> tuple[Expr, Expr]:
    """The hi and lo bfloat16 parts of float32 `x` (uint16; hi = rounded, lo = the rounded remainder: 16 significant
    bits together), or with `y` of a word holding x's part in its low half and y's in its high half (uint32: a VNNI
    pair). `tiny`: values that may be below 2^-100 (softmax weights: the attention kernels' exp2 gives 2^-125 for
    scores 125 below the max) get no lo part, whose float32 would be a denormal (a ~100-cycle microcode assist per
    vector operation on Intel CPUs)."""
    def lo(v: Expr) -> Expr:
        rest = v - T.reinterpret("float32", round_bf16(v))
        return T.Select(v > T.float32(1e-30), rest, T.float32(0)) if tiny else rest
    if y is None:
        return tuple(T.Cast("uint16", T.shift_right(round_bf16(v), T.uint32(16))) for v in (x, lo(x)))
    return tuple(T.shift_right(round_bf16(a), T.uint32(16)) + round_bf16(b) for a, b in ((x, y), (lo(x), lo(y))))

