"""Our relax pipeline: fusion that stock TVM lacks, GPU schedules, then the standard VM lowering."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl

from .cpu_kernels import cpu_kernel_passes
from .cpu_schedules import schedule_cpu_matmuls
from .passes import fuse_dequantize_matmul, mark_noalias
from .target import is_gpu, matmul_rule_is_safe


def optimize_passes(target: tvm.target.Target, prefill_precision: str = "f32", kv: dict | None = None,
                    decode_precision: str = "f32") -> list:
    """Everything up to scheduled TIR (still dataflow Relax). `prefill_precision`: of the CPU prefill GEMMs on AMX
    (`config.schema.PREFILL_PRECISIONS`); `decode_precision`: of the CPU decode GEMVs (`DECODE_PRECISIONS`). `kv`: the
    model's KV-cache shape (compile.py's metadata), for the CPU attention."""
    backend = cuda_pipeline if is_gpu(target) else cpu_pipeline
    passes = ([] if is_gpu(target) else cpu_kernel_passes(target, kv)) + [
        *backend.library_dispatch_passes(target),  # sort / scan / sampling ops to the target's kernels
        relax.transform.FuseTransposeMatmul(),  # matmul(x, permute_dims(w)) -> one NT matmul, no transpose kernel
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        fuse_dequantize_matmul(),
        relax.transform.DeadCodeElimination(),
    ]
    schedules = (gpu_schedules(target) if is_gpu(target)
                 else [schedule_cpu_matmuls(target, prefill_precision, decode_precision)])
    return passes + schedules + [mark_noalias]


def gpu_schedules(target: tvm.target.Target) -> list:
    """Thread bindings for every kernel on GPU targets (unscheduled kernels would silently run on the host)."""
    if not is_gpu(target):
        return []
    matmul = [dl.gpu.Matmul()] if matmul_rule_is_safe(target) else []
    return [dl.ApplyDefaultSchedule(*matmul, dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())]


def lowering_passes(target: tvm.target.Target) -> list:
    backend = cuda_pipeline if is_gpu(target) else cpu_pipeline
    return backend.dataflow_lower_passes(target) + backend.finalize_passes(target)


def optimize(mod: tvm.IRModule, target: tvm.target.Target, prefill_precision: str = "f32",
             kv: dict | None = None, decode_precision: str = "f32") -> tvm.IRModule:
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(optimize_passes(target, prefill_precision, kv, decode_precision))(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target):
    """Optimized (dataflow) module -> VM executable."""
    lower = tvm.transform.Sequential(lowering_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="MLCLowering")
    def relax_pipeline(m, _ctx):
        with target:
            return lower(m)

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=relax_pipeline)
