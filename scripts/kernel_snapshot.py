"""Print every hand-written CPU kernel (a grid of shapes and variants, AMX ones included) as TVMScript, to prove a
refactor of mlc_llm/compiler/ changed no kernel: snapshot before, snapshot after, compare.

    python scripts/kernel_snapshot.py -o /tmp/before.json          # on the old commit
    python scripts/kernel_snapshot.py --compare /tmp/before.json   # on the new one: names the kernels that differ

Kernels are compared by their printed TVMScript (`PrimFunc.script()`: the whole IR, dtypes and attributes included),
which does not depend on whether a kernel was parsed from text or built by a `@T.prim_func`. Where a rewrite names
its variables differently, compare structurally instead (`tvm_ffi.structural_equal`, free variables mapped), with
the old kernels built in the same process from a checkout of the old commit:

    git worktree add /tmp/old HEAD                                  # before the refactor
    python scripts/kernel_snapshot.py --against /tmp/old            # after it

Kernels of different structure (an added `T.bind` alias, say) are compiled for this CPU and their instructions
compared (not the AMX ones, which may not compile here): the same instructions count as unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Callable

import tvm
import tvm_ffi


def kernels(only: str = "") -> dict[str, Callable[[], tvm.tirx.PrimFunc]]:
    from mlc_llm.compiler import cpu_activation, cpu_attention, cpu_gemv, cpu_q4_blocked, cpu_q4_int8

    out: dict[str, Callable[[], tvm.tirx.PrimFunc]] = {}
    for hq, hkv, d in ((9, 3, 64), (14, 2, 64), (4, 1, 256), (4, 2, 40)):
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
        for layout in ("1s", "b1", "11"):
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
    return {name: make for name, make in out.items() if only in name}


def build(makers: dict[str, Callable[[], tvm.tirx.PrimFunc]]) -> dict[str, object]:
    """name -> PrimFunc, or the message of a shape the kernel refuses (that it refuses is part of the snapshot)."""
    out: dict[str, object] = {}
    for name, make in makers.items():
        try:
            out[name] = make()
        except ValueError as e:
            out[name] = f"refused: {e}"
        except AttributeError as e:  # a kernel the old tree does not have
            out[name] = f"missing: {e}"
    return out


@contextlib.contextmanager
def package_of(old_tree: str):
    """Within the block, `import mlc_llm...` imports the package of the checkout `old_tree`; this tree's modules are
    back after it (objects built inside, such as PrimFuncs, stay valid)."""
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "mlc_llm" or m.startswith("mlc_llm.")}
    sys.path.insert(0, os.path.abspath(old_tree))
    try:
        yield
        assert sys.modules["mlc_llm"].__file__.startswith(os.path.abspath(old_tree)), "old tree not imported"
    finally:
        sys.path.pop(0)
        for m in [m for m in sys.modules if m == "mlc_llm" or m.startswith("mlc_llm.")]:
            del sys.modules[m]
        sys.modules.update(saved)


def against(old_tree: str, new: dict[str, object], only: str = "") -> int:
    """Build the kernels of the mlc_llm package in `old_tree` in this process and compare each with `new`'s."""
    with package_of(old_tree):
        old = build(kernels(only))
    renamed, same_code, differ = 0, 0, []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
            if a != b:
                differ.append(name)
        elif a.script() != b.script():
            if tvm_ffi.structural_equal(a, b, map_free_vars=True):
                renamed += 1
            elif "amx=True" not in name and machine_code(a) == machine_code(b):
                same_code += 1
            else:
                differ.append(name)
    for name in differ:
        print(f"differs: {name}")
    print(f"{len(differ)} of {len(new)} kernels differ; {renamed} print differently with equal structure; "
          f"{same_code} differ in structure and compile to the same instructions for this CPU", file=sys.stderr)
    return 1 if differ else 0


def machine_code(func: tvm.tirx.PrimFunc) -> list[str]:
    """The kernel's assembly for this CPU, without debug information, labels and directives (which name variables)."""
    from mlc_llm.compiler.target import make_target

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=make_target("cpu"))
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm").split(".section\t.debug")[0]
    return [line for line in asm.splitlines()
            if line.strip() and not line.strip().startswith(("#", ".loc", ".file", ".cfi", ".Ltmp", ".Lfunc"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", help="write the snapshot (JSON: name -> TVMScript)")
    ap.add_argument("--compare", help="a snapshot to compare with")
    ap.add_argument("--against", metavar="TREE", help="a checkout of the old commit: compare structurally")
    ap.add_argument("-k", metavar="TEXT", default="", help="only the kernels whose name contains TEXT")
    a = ap.parse_args()
    funcs = build(kernels(a.k))
    snap = {name: f if isinstance(f, str) else f.script() for name, f in funcs.items()}
    print(f"{len(snap)} kernels", file=sys.stderr)
    if a.against:
        return against(a.against, funcs, a.k)
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
