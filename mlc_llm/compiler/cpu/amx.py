"""AMX-BF16 (Sapphire Rapids and later) as TIR text: which targets have it, the tile-state request, the tile
configuration, and float32 split into bfloat16 parts for the tile products. Tile numbers and the configuration
bytes must be constant immediates of the intrinsics, which is why these kernels are text."""
from __future__ import annotations

import tvm

AMX_CPUS = ("sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids")
_BF16_MASK = "T.uint32(4294901760)"

# Linux hands out the AMX tile state only on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), 0 when
# granted. Our AMX kernels make it at each call and take their non-AMX path when refused.
AMX_REQUEST = """
perm = T.alloc_buffer((1,), "int64", scope="global")
perm[0] = T.call_extern("int64", "syscall", T.int64(158), T.int64(4131), T.int64(18))
"""


def has_amx(target: tvm.target.Target) -> bool:
    """Whether code for `target` may use AMX-BF16 tiles (and AVX512-BF16, which every AMX CPU has: the AMX GEMM
    converts x with it)."""
    if target.kind.name != "llvm":
        return False
    mattr = [str(a) for a in (target.attrs.get("mattr") or [])]
    return str(target.attrs.get("mcpu", "")) in AMX_CPUS or all(f in mattr for f in ("+amx-bf16", "+amx-tile",
                                                                                      "+avx512bf16"))


def intrin(name: str, *args: str) -> str:
    """TIR text calling the x86 intrinsic `llvm.x86.<name>` (tileloadd64, tdpbf16ps, ...)."""
    return f'T.evaluate(T.call_llvm_intrin("void", "llvm.x86.{name}", {", ".join(args)}))'


def tile_config(rows: tuple = (16,) * 8) -> str:
    """TIR lines loading the tile configuration our kernels use: palette 1, tiles 0-7 of 64 bytes x `rows[t]` rows
    (16 by default)."""
    return "\n".join([
        'cfg = T.alloc_buffer((64,), "uint8", scope="global")',
        "for i in range(64):", "    cfg[i] = T.uint8(0)",
        "cfg[0] = T.uint8(1)",
        "for t in range(8):", "    cfg[16 + 2 * t] = T.uint8(64)",
        *[f"cfg[{48 + t}] = T.uint8({r})" for t, r in enumerate(rows)],
        intrin("ldtilecfg", "T.address_of(cfg[0])")])


def round_bf16(expr: str) -> str:
    """uint32 bits of float32 `expr` rounded to the nearest bfloat16 (ties to even), in the upper 16 bits."""
    u = f'T.reinterpret("uint32", {expr})'
    return (f"T.bitwise_and({u} + T.uint32(32767) + T.bitwise_and(T.shift_right({u}, T.uint32(16)), T.uint32(1)), "
            f"{_BF16_MASK})")


def bf16x32(lo: str, hi: str) -> str:
    """TIR text of the uint16x32 bfloat16 bits of two float32x16 expressions (`lo` in lanes 0-15, `hi` in 16-31),
    rounded to nearest even as `round_bf16`: one AVX512-BF16 instruction (vcvtne2ps2bf16) for 32 values instead of
    ~7 integer operations per 16 and a pack."""
    return (f'T.reinterpret("uint16x32", T.call_llvm_pure_intrin("bfloat16x32", '
            f'"llvm.x86.avx512bf16.cvtne2ps2bf16.512", {hi}, {lo}))')


def bf16_parts(x: str, y: str = "", tiny: bool = False) -> tuple[str, str]:
    """TIR text of the hi and lo bfloat16 parts of float32 `x` (uint16; hi = rounded, lo = the rounded remainder:
    16 significant bits together), or with `y` of a word holding x's part in its low half and y's in its high half
    (uint32: a VNNI pair). `tiny`: values that may be below 2^-100 (softmax weights: the attention kernels' exp2 gives
    2^-125 for scores 125 below the max) get no lo part, whose float32 would be a denormal (a ~100-cycle microcode
    assist per vector operation on Intel CPUs)."""
    def lo(v: str) -> str:
        rest = f'{v} - T.reinterpret("float32", {round_bf16(v)})'
        return f"T.Select({v} > T.float32(1e-30), {rest}, T.float32(0))" if tiny else rest
    if not y:
        return tuple(f'T.Cast("uint16", T.shift_right({round_bf16(v)}, T.uint32(16)))' for v in (x, lo(x)))
    return tuple(f"T.shift_right({round_bf16(a)}, T.uint32(16)) + {round_bf16(b)}"
                 for a, b in ((x, y), (lo(x), lo(y))))
