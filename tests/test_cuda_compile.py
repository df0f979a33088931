"""The CUDA library cross-compiles on this GPU-less machine with every kernel bound to the GPU."""
from __future__ import annotations

import re

import pytest

from mlc_llm.compiler import pipeline
from mlc_llm.compiler.passes import unbound_gpu_kernels
from mlc_llm.steps.compile import CompileError, compile_model, optimized_module
from tvm import tirx

from .conftest import SMOLLM_DIR, run_snakemake


@pytest.fixture(scope="module")
def smollm_cuda(pipeline_dir):
    r = run_snakemake(pipeline_dir, "build_smollm2_cuda")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = pipeline_dir / SMOLLM_DIR.format(quant="q4f16_1")
    return d, d / "lib" / "cuda-sm_90a.so"


def test_every_kernel_of_the_cuda_library_is_a_gpu_kernel(smollm_cuda):
    model_dir, lib = smollm_cuda
    assert lib.exists()
    mod, _ = optimized_module(model_dir, "cuda")
    prim_funcs = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(prim_funcs) > 20
    assert unbound_gpu_kernels(mod) == []
    assert any(n.startswith("fused_dequantize") and "matmul" in n for n in prim_funcs)  # int4 fused into matmuls
    # No GPU here, so the library embeds CUDA source (compiled by NVRTC at load): each kernel must be in it.
    source = lib.read_bytes().decode("latin-1")
    kernels = set(re.findall(r'__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source))
    missing = [n for n in prim_funcs if not any(k.startswith(f"{n}_kernel") for k in kernels)]
    assert missing == [], f"kernels not in the CUDA module: {missing}"


def test_unscheduled_gpu_kernels_are_refused(smollm_cuda, monkeypatch, tmp_path):
    model_dir, _ = smollm_cuda
    monkeypatch.setattr(pipeline, "gpu_schedules", lambda target: [])
    with pytest.raises(CompileError, match="kernels have no GPU schedule and would run on the host: .*matmul"):
        compile_model(model_dir, "cuda", tmp_path / "x.so")
    assert not (tmp_path / "x.so").exists()


@pytest.mark.parametrize("model_type", ["qwen2", "gemma3_text"])
def test_new_families_cross_compile_for_cuda(tmp_path, model_type):
    """q/k/v bias (Qwen2) and Gemma 3's windowed layers, per-layer RoPE in the model and sandwich norms: every kernel
    of the q4f16_1 library bound to GPU threads."""
    from mlc_llm.steps.gen_config import gen_config

    from .tiny_hf import write_tiny_family

    write_tiny_family(tmp_path / "hf", model_type, intermediate_size=256, vocab_size=320)
    gen_config(str(tmp_path / "hf"), "q4f16_1", "chatml", tmp_path / "m")
    mod, _ = optimized_module(tmp_path / "m", "cuda")
    assert unbound_gpu_kernels(mod) == []
    names = [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    if model_type == "gemma3_text":
        assert any("rope_by_layer" in n for n in names)
