"""Relax / TIR passes of our pipeline.

- FuseDequantizeMatmul: stock FuseOps leaves the int4 dequantize as its own kernel that writes the whole float
  weight to memory; matching "call_tir(dequantize*) feeding call_tir(*matmul*)" and fusing them with FuseTIR gives one
  kernel that decodes weights on the fly (MLC_REFERENCE.md §3).
- MarkNoAlias: kernels without `tirx.noalias` get generic alias metadata from LLVM and spill accumulators.
- unbound_gpu_kernels: on GPU targets an unscheduled PrimFunc silently becomes a host loop; we refuse to build that.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, is_tuple, wildcard


def _callee_name(call: relax.Call) -> str:
    return call.args[0].name_hint


def _dequant_matmul_patterns() -> list:
    patterns = []
    for n_args, deq_pos in ((2, 1), (3, 1)):
        deq = is_op("relax.call_tir")(wildcard(), wildcard())
        args = [wildcard() for _ in range(n_args)]
        args[deq_pos] = deq
        mm = is_op("relax.call_tir")(wildcard(), is_tuple(args))

        def check(ctx, deq=deq, mm=mm) -> bool:
            d, m = ctx.annotated_expr["deq"], ctx.annotated_expr["mm"]
            return _callee_name(d).startswith("dequantize") and "matmul" in _callee_name(m)

        patterns.append(relax.transform.FusionPattern(
            f"dequantize_matmul_{n_args}", mm, {"deq": deq, "mm": mm}, check))
    return patterns


def fuse_dequantize_matmul() -> tvm.transform.Pass:
    return tvm.transform.Sequential([
        relax.transform.FuseOpsByPattern(_dequant_matmul_patterns(), bind_constants=False, annotate_codegen=False),
        relax.transform.FuseTIR(),
    ], name="FuseDequantizeMatmul")


@tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
def mark_noalias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    updates = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and (func.attrs is None or "tirx.noalias" not in func.attrs):
            updates[gv] = func.with_attr("tirx.noalias", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _is_thread_bound(func: tirx.PrimFunc) -> bool:
    # The printed TIR is the one stable view of loop bindings across TVM versions (no stmt visitor in 0.27's tirx).
    return "blockIdx." in func.script()


def unbound_gpu_kernels(mod: tvm.IRModule) -> list[str]:
    """Names of PrimFuncs that would run on the host because no loop is bound to a GPU thread."""
    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and not _is_thread_bound(f))
