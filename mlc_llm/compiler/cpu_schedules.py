"""CPU schedules for the linear layers: the (dequantize +) NT matmul kernels that take ~95 % of a step.

TVM's stock CPU lowering of `fused_dequantize*_NT_matmul*` first decodes the *whole* int4 weight into a float32 buffer
and then runs a serial scalar triple loop. The schedule here instead:
- inlines the dequantize into the matmul (int4 decoded in registers, never written out);
- splits the reduction over K into 16 vector lanes with `rfactor` (partial sums per lane in a local buffer,
  vectorized over K, which is contiguous in both the activations and the packed weights), then adds the 16 lanes;
- runs output rows in blocks of 8 in parallel over TVM's thread pool, with the rows of the batch inside a block so
  that a block's weights stay in L1 across batch rows;
- computes an epilogue (the residual add) right after each block.
It applies to decode (`[batch, 1, K]`), prefill (`[1, seq_len, K]`) and unquantized (`q0`) matmuls alike. A kernel it
cannot schedule is left as it was (slow, still correct). (q4 layers get the kernels of `cpu_q4_blocked.py` /
`cpu_gemv.py` instead; on AMX targets prefill's gate_up GEMM and the activation kernel after it become one kernel:
`fuse_gate_up_silu`.)
"""
from __future__ import annotations

import logging
from typing import Optional

import tvm
from tvm.s_tir import Schedule

from ..config.schema import DECODE_PRECISIONS, PREFILL_PRECISIONS
from . import cpu_gemv, cpu_q4_blocked, cpu_q4_int8
from .cpu.amx import has_amx
from .cpu_kernels import SILU_KERNEL  # the activation kernel swapped in for silu(gate) * up

logger = logging.getLogger(__name__)

LANES = 16  # float32 lanes of an AVX-512 register
ROW_BLOCK = 8  # output rows per parallel task


def _block(sch: Schedule, name: str):
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - tvm raises its own error type for a missing block
        return None


def _static_extent(sch: Schedule, loop) -> Optional[int]:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else None


def schedule_nt_matmul(func: tvm.tirx.PrimFunc) -> Optional[tvm.tirx.PrimFunc]:
    """The scheduled kernel, or None when `func` is not a (dequantize +) NT matmul this schedule handles."""
    sch = Schedule(func)
    mm = _block(sch, "NT_matmul")
    if mm is None:
        return None
    deq = _block(sch, "dequantize")
    if deq is not None:
        sch.compute_inline(deq)
    loops = sch.get_loops(mm)
    if len(loops) != 4:
        return None
    b, m, n, k = loops
    k_extent = _static_extent(sch, k)
    if k_extent is None or k_extent % LANES:
        return None
    ko, ki = sch.split(k, [None, LANES])
    rf = sch.rfactor(ki, factor_axis=3)
    i0, i1, i2, k0, k1 = sch.get_loops(rf)
    no, ni = sch.split(i2, [None, ROW_BLOCK])
    sch.reorder(no, i0, i1, ni, k0, k1)
    sch.parallel(no)
    sch.vectorize(k1)
    sch.reverse_compute_at(mm, ni)
    epilogue = _block(sch, "T_add")  # the residual add fused after down_proj / o_proj
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, ni)
    sch.set_scope(rf, 0, "local")
    sch.decompose_reduction(rf, k0)
    return sch.mod["main"]


def schedule_cpu_matmuls(target: tvm.target.Target, prefill_precision: str = "f32",
                         decode_precision: str = "f32") -> tvm.transform.Pass:
    """Blocked q4f32_cpu linear layers get the kernels of `cpu_q4_blocked.py` (prefill on AMX tiles where `target`
    has them, in `prefill_precision`); the int8 kernels of `cpu_q4_int8.py` instead for the decode ones (x of
    [B, 1, K]) with `decode_precision` int8, for the prefill ones ([1, S, K]) with `prefill_precision` int8; NK q4f32
    ones the batch-tiled kernel of `cpu_gemv.py`; other matmuls the rfactor schedule above."""
    for kind, value, allowed in (("prefill", prefill_precision, PREFILL_PRECISIONS),
                                 ("decode", decode_precision, DECODE_PRECISIONS)):
        if value not in allowed:
            raise ValueError(f"unknown {kind} precision '{value}' (allowed: {', '.join(allowed)})")
    int8_layouts = tuple(layout for layout, p in (("b1", decode_precision), ("1s", prefill_precision)) if p == "int8")
    if int8_layouts and not cpu_q4_int8.supported(target):
        raise ValueError(f"precision int8 needs AVX512-VNNI, which target {target} lacks (Xeons since Cascade Lake "
                         "and AMD Zen 4 have it); use f32")
    amx, prefetch_ahead = has_amx(target), cpu_q4_blocked.prefetch_pays(target)
    blocked_precision = "f32" if prefill_precision == "int8" else prefill_precision

    @tvm.transform.module_pass(opt_level=0, name="ScheduleCPUMatmul")
    def schedule(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates, blocked = {}, {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or "NT_matmul" not in gv.name_hint:
                continue
            try:
                scheduled = cpu_q4_int8.replace_int8_matmul(func, int8_layouts, prefetch_ahead)
                if scheduled is None:
                    scheduled = cpu_q4_blocked.replace_blocked_q4_matmul(func, amx, blocked_precision, prefetch_ahead)
                    if scheduled is not None:  # (the gate_up + silu fusion below takes these)
                        blocked[gv] = cpu_gemv._signature(func, cpu_q4_blocked.BLOCK)
                scheduled = scheduled or cpu_gemv.replace_q4_matmul(func) or schedule_nt_matmul(func)
            except Exception as e:  # noqa: BLE001 - a shape this schedule does not cover keeps the stock kernel
                logger.warning("no CPU schedule for %s: %s", gv.name_hint, str(e).splitlines()[0] if str(e) else e)
                continue
            if scheduled is not None:
                updates[gv] = scheduled
        for gv, func in updates.items():
            mod[gv] = func
        if amx:
            mod = fuse_gate_up_silu(mod, blocked, blocked_precision, prefetch_ahead)
        return mod

    return schedule




def fuse_gate_up_silu(mod: tvm.IRModule, blocked: dict, precision: str = "f32",
                      prefetch_ahead: bool = True) -> tvm.IRModule:
    """In prefill calls (rows as [1, R, K]: layout "1s"), a blocked gate_up GEMM (`blocked`: GlobalVar -> its
    (N, K, layout, residual)) whose output only feeds the activation kernel becomes one call of
    `cpu_q4_blocked.fused_silu_kernel` (AMX targets: its tiles write silu(gate) * up directly). Decode calls keep the
    two kernels (their rows take the GEMV path, which the fused kernel runs into a scratch anyway). The GEMM call left
    unused is removed by the pipeline's dead-code elimination, run here."""
    from tvm import relax

    fused: dict = {}
    bb = relax.BlockBuilder(mod)  # adds the fused kernels with their GlobalVars typed

    def fused_gv(gv):
        if gv not in fused:
            n, k, layout, _ = blocked[gv]
            kernel = cpu_q4_blocked.fused_silu_kernel(n, k, layout, amx=True, precision=precision,
                                                      prefetch_ahead=prefetch_ahead,
                                                      scale_dtype=cpu_gemv.scale_dtype_of(mod[gv]))
            fused[gv] = bb.add_func(kernel.with_attr(cpu_gemv.KERNEL_ATTR, "q4_blocked64_silu"),
                                    f"{gv.name_hint}_silu")
        return fused[gv]

    call_tir = tvm.ir.Op.get("relax.call_tir")

    def is_call_tir(expr) -> bool:
        return isinstance(expr, relax.Call) and expr.op.same_as(call_tir)

    def fusable(call) -> bool:
        sig = blocked.get(call.args[0]) if is_call_tir(call) else None
        return sig is not None and sig[2] == "1s" and not sig[3] and sig[0] % (2 * cpu_q4_blocked.BLOCK) == 0

    rewritten = {}
    for fn_gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks, changed = [], False
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                blocks.append(block)
                continue
            users = relax.analysis.udchain(block)
            values = {b.var: b.value for b in block.bindings if isinstance(b, relax.VarBinding)}
            bindings = []
            for b in block.bindings:
                v = b.value
                if (isinstance(b, relax.VarBinding) and is_call_tir(v) and v.args[0].name_hint.startswith(SILU_KERNEL)
                        and len(v.args[1].fields) == 1):
                    gu = v.args[1].fields[0]
                    src = values.get(gu)
                    if (isinstance(gu, relax.DataflowVar) and fusable(src) and len(users.get(gu, [])) == 1
                            and len(src.args) == 2):
                        b = relax.VarBinding(b.var, relax.call_tir(fused_gv(src.args[0]), src.args[1],
                                                                   v.ty_args[0]))
                        changed = True
                bindings.append(b)
            blocks.append(relax.DataflowBlock(bindings))
        if changed:
            rewritten[fn_gv] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty,
                                              func.is_pure, func.attrs)
    if not rewritten:
        return mod
    mod = bb.get()
    for fn_gv, func in rewritten.items():
        mod[fn_gv] = func
    return relax.transform.DeadCodeElimination()(mod)
