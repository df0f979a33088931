"""Device name -> TVM target. Device names are the user's words (`cpu`, `cuda`); targets are TVM's."""
from __future__ import annotations

import tvm

DEVICES = ("cpu", "cuda")
DEFAULT_CUDA_ARCH = "sm_90a"  # H100 / H200; override with --device cuda:sm_80 or device.arch in the config
# Device limits the schedule rules read (a GPU-less build cannot query them); these hold for every NVIDIA GPU
# since Volta.
CUDA_LIMITS = {"max_num_threads": 1024, "max_threads_per_block": 1024, "thread_warp_size": 32,
               "max_shared_memory_per_block": 49152, "registers_per_block": 65536,
               "l2_cache_size_bytes": 40 * 1024 * 1024}


def parse_device(device: str) -> tuple[str, str | None]:
    """'cuda:sm_80' -> ('cuda', 'sm_80'); 'llvm' is accepted as 'cpu'."""
    kind, _, arch = device.partition(":")
    kind = {"llvm": "cpu"}.get(kind, kind)
    if kind not in DEVICES:
        raise ValueError(f"unknown device '{device}' (allowed: {', '.join(DEVICES)}, optionally cuda:<sm_XX>)")
    if arch and kind == "cuda" and not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
        raise ValueError(f"bad CUDA arch '{arch}' (expected e.g. sm_80, sm_90)")
    return kind, arch or None


def make_target(device: str) -> tvm.target.Target:
    kind, arch = parse_device(device)
    host = tvm.target.Target.from_device(tvm.cpu())  # native mcpu: fast float16 and AVX-512 where present
    if kind == "cpu":
        return host
    return tvm.target.Target({"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH, **CUDA_LIMITS}, host=host)


def is_gpu(target: tvm.target.Target) -> bool:
    return "gpu" in list(target.keys)


def matmul_rule_is_safe(target: tvm.target.Target) -> bool:
    """dlight's gpu.Matmul segfaults in TVM 0.27 on SmolLM2-sized GEMMs for sm_80 / sm_90 (not sm_90a); there the
    GEMV-family rules schedule the prefill GEMMs instead (correct, slower)."""
    return str(target.attrs.get("arch", "")) == "sm_90a"
