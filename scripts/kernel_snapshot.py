"""Print every hand-written CPU kernel (a grid of shapes and variants, AMX ones included) as TVMScript, to prove a
refactor of mlc_llm/compiler/ changed no kernel: snapshot before, snapshot after, compare.

    python scripts/kernel_snapshot.py -o /tmp/before.json          # on the old commit
    python scripts/kernel_snapshot.py --compare /tmp/before.json   # on the new one: names the kernels that differ

Kernels are compared by their printed TVMScript (`PrimFunc.script()`: the whole IR, dtypes and attributes included),
which does not depend on whether a kernel was parsed from text or built by a `@T.prim_func`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import tvm


def kernels() -> dict[str, Callable[[], tvm.tirx.PrimFunc]]:
    from mlc_llm.compiler import cpu_activation, cpu_attention, cpu_gemv, cpu_q4_blocked, cpu_q4_int8

    out: dict[str, Callable[[], tvm.tirx.PrimFunc]] = {}
    for hq, hkv, d in ((9, 3, 64), (14, 2, 64), (4, 1, 256)):
        shape = f"{hq}x{hkv}x{d}"
        out[f"decode {shape}"] = lambda a=(hq, hkv, d): cpu_attention.decode_kernel(*a, "float32")
        out[f"decode sliding {shape}"] = lambda a=(hq, hkv, d): cpu_attention.decode_kernel(*a, "float32", True)
        for amx in (False, True):
            out[f"ragged prefill {shape} amx={amx}"] = \
                lambda a=(hq, hkv, d), amx=amx: cpu_attention.ragged_prefill_kernel(*a, "float32", amx=amx)
        out[f"paged prefill {shape}"] = lambda a=(hq, hkv, d): cpu_attention.paged_prefill_kernel(*a, "float32")
        out[f"paged prefill window {shape}"] = \
            lambda a=(hq, hkv, d): cpu_attention.paged_prefill_kernel(*a, "float32", window=512)
        out[f"rope {shape}"] = lambda a=(hq, hkv, d): cpu_attention.rope_kernel(*a, "float32", 10000.0)
    out["rope partial"] = lambda: cpu_attention.rope_kernel(8, 8, 64, "float32", 10000.0, 0.5, rotary_dim=32)
    for n, k in ((576, 1536), (1536, 576), (49152, 576), (896, 4864)):
        for layout in ("1s", "2s"):
            for residual in (False, True, cpu_gemv.BIAS):
                tag = f"{n}x{k} {layout} residual={residual}"
                out[f"gemv stock {tag}"] = lambda a=(n, k, layout, residual): cpu_gemv.stock_kernel(*a)
                out[f"gemv tiled {tag}"] = lambda a=(n, k, layout, residual): cpu_gemv.tiled_kernel(*a)
                for amx in (False, True):
                    for precision in ("f32", "bf16"):
                        out[f"blocked q4 {tag} amx={amx} {precision}"] = \
                            lambda a=(n, k, layout, residual), amx=amx, p=precision: \
                            cpu_q4_blocked.blocked_kernel(*a, amx=amx, precision=p)
        for layout in ("b1", "1s"):
            for residual in (False, True, cpu_gemv.BIAS):
                for ahead in (True, False):
                    tag = f"{n}x{k} {layout} residual={residual} prefetch={ahead}"
                    out[f"int8 {tag}"] = lambda a=(n, k, layout, residual), p=ahead: cpu_q4_int8.gemv_kernel(
                        *a, prefetch_ahead=p)
        out[f"blocked q4 {n}x{k} b1 no prefetch"] = lambda a=(n, k): cpu_q4_blocked.blocked_kernel(
            *a, "b1", True, prefetch_ahead=False)
        # float16 scales (q4f32_cpu_f16scale): every kernel family once
        f16 = {"stock": lambda a=(n, k): cpu_gemv.stock_kernel(*a, "1s", True, 0, "float16"),
               "tiled": lambda a=(n, k): cpu_gemv.tiled_kernel(*a, "1s", True, scale_dtype="float16"),
               "blocked": lambda a=(n, k): cpu_q4_blocked.blocked_kernel(*a, "1s", True, scale_dtype="float16"),
               "blocked amx": lambda a=(n, k): cpu_q4_blocked.blocked_kernel(*a, "1s", True, amx=True,
                                                                             scale_dtype="float16"),
               "blocked amx bf16": lambda a=(n, k): cpu_q4_blocked.blocked_kernel(
                   *a, "1s", True, amx=True, precision="bf16", scale_dtype="float16"),
               "int8": lambda a=(n, k): cpu_q4_int8.gemv_kernel(*a, "b1", True, scale_dtype="float16")}
        out.update({f"{kind} {n}x{k} float16 scales": make for kind, make in f16.items()})
    for n, k in ((3072, 576), (9728, 896)):
        for amx in (False, True):
            for precision in ("f32", "bf16"):
                out[f"gate_up silu {n}x{k} amx={amx} {precision}"] = \
                    lambda a=(n, k), amx=amx, p=precision: cpu_q4_blocked.fused_silu_kernel(*a, "1s", amx=amx,
                                                                                              precision=p)
    for inter in (1536, 4864):
        for act in ("silu", "gelu_tanh"):
            out[f"{act} mul {inter}"] = lambda i=inter, a=act: cpu_activation.silu_mul_kernel(i, "float32", a)
    for hidden in (576, 896):
        out[f"rms norm {hidden}"] = lambda h=hidden: cpu_activation.rms_norm_kernel(h, 1e-5, "float32")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", help="write the snapshot (JSON: name -> TVMScript)")
    ap.add_argument("--compare", help="a snapshot to compare with")
    a = ap.parse_args()
    snap = {}
    for name, make in kernels().items():
        try:
            snap[name] = make().script()
        except ValueError as e:  # a shape a kernel refuses: that it refuses is part of the snapshot
            snap[name] = f"refused: {e}"
    print(f"{len(snap)} kernels", file=sys.stderr)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(snap, f, indent=0, sort_keys=True)
    if not a.compare:
        return 0
    with open(a.compare) as f:
        old = json.load(f)
    differ = sorted(n for n in old.keys() | snap.keys() if old.get(n) != snap.get(n))
    for name in differ:
        print(f"differs: {name}")
    print(f"{len(differ)} of {len(snap)} kernels differ", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
