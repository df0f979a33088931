"""Our relax pipeline: fusion that stock TVM lacks, GPU schedules, then the standard VM lowering."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.backend.cuda import pipeline as cuda_pipeline
from tvm.s_tir import dlight as dl

from .passes import fuse_dequantize_matmul, mark_noalias
from .target import is_gpu


def optimize_passes(target: tvm.target.Target) -> list:
    """Everything up to scheduled TIR (still dataflow Relax)."""
    passes = [
        relax.transform.FuseTransposeMatmul(),  # matmul(x, permute_dims(w)) -> one NT matmul, no transpose kernel
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        fuse_dequantize_matmul(),
        relax.transform.DeadCodeElimination(),
    ]
    if is_gpu(target):
        passes.append(dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        ))
    passes.append(mark_noalias)
    return passes


def lowering_passes(target: tvm.target.Target) -> list:
    backend = cuda_pipeline if is_gpu(target) else cpu_pipeline
    return backend.dataflow_lower_passes(target) + backend.finalize_passes(target)


def optimize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(optimize_passes(target))(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target):
    """Optimized (dataflow) module -> VM executable."""
    lower = tvm.transform.Sequential(lowering_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="MLCLowering")
    def relax_pipeline(m, _ctx):
        with target:
            return lower(m)

    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target, relax_pipeline=relax_pipeline)
