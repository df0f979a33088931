"""Session fixtures: the real SmolLM2 artifacts, built by the project's own Snakemake pipeline into a temp workdir."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOLLM_DIR = "artifacts/SmolLM2-135M-Instruct-{quant}"


def run_snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def run_cli(*args: str, timeout: int = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mlc_llm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


# Tests that build or load a real model, compile kernels or drive a browser: `pytest -m "not slow"` leaves them out.
SLOW_FIXTURES = {"pipeline_dir", "browser"}
SLOW_MODULES = {"test_real_models", "test_cuda_compile", "test_gpu_scripts", "test_cpu_attention", "test_cpu_codegen",
                "test_cpu_schedules", "test_cpu_activation", "test_families", "test_quantization", "test_jit",
                "test_numerics", "test_pipeline", "test_gguf_tokenizers"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.split(".")[-1] in \
                SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def host_has_amx() -> bool:
    import tvm

    from mlc_llm.compiler.cpu.amx import has_amx

    return has_amx(tvm.target.Target.from_device(tvm.cpu()))


def host_has_vnni() -> bool:
    import tvm

    from mlc_llm.compiler import cpu_q4_int8

    return cpu_q4_int8.supported(tvm.target.Target.from_device(tvm.cpu()))


def pytest_runtest_setup(item):
    """Tests marked `amx` skip on a CPU without AMX-BF16 tiles, those marked `vnni` on one without AVX512-VNNI; with
    MLC_REQUIRE_AMX=1 / MLC_REQUIRE_VNNI=1 (set them where the machine has the feature) they fail instead, so that a
    CPU or kernel change cannot silently turn them into skips."""
    for marker, has, env, what in (("amx", host_has_amx, "MLC_REQUIRE_AMX", "AMX-BF16 tiles (or Linux does not grant "
                                                                            "them)"),
                                   ("vnni", host_has_vnni, "MLC_REQUIRE_VNNI", "AVX512-VNNI")):
        if item.get_closest_marker(marker) is None or has():
            continue
        if os.environ.get(env) == "1":
            pytest.fail(f"{env}=1 but this CPU has no {what}")
        pytest.skip(f"this CPU has no {what}")


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def smollm_q4(pipeline_dir):
    """`snakemake build_smollm2_cpu` from nothing, then the same command again (which must do nothing)."""
    first = run_snakemake(pipeline_dir, "build_smollm2_cpu")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    second = run_snakemake(pipeline_dir, "build_smollm2_cpu")
    d = pipeline_dir / SMOLLM_DIR.format(quant="q4f32_cpu")
    return SimpleNamespace(dir=d, lib=d / "lib" / "cpu.so", first=first, second=second)


def _smollm_as(pipeline_dir, quant: str) -> SimpleNamespace:
    """`snakemake build_smollm2_cpu` with another quantization (its own artifact folder in the same workdir)."""
    r = run_snakemake(pipeline_dir, "build_smollm2_cpu", "--config", "deployment=smollm2_cpu",
                      f"overrides=[quantization={quant}]")
    assert r.returncode == 0, r.stderr[-4000:]
    d = pipeline_dir / SMOLLM_DIR.format(quant=quant)
    return SimpleNamespace(dir=d, lib=d / "lib" / "cpu.so")


@pytest.fixture(scope="session")
def smollm_q4_f16scale(pipeline_dir, smollm_q4):
    return _smollm_as(pipeline_dir, "q4f32_cpu_f16scale")


@pytest.fixture(scope="session")
def smollm_q0(pipeline_dir, smollm_q4):
    return _smollm_as(pipeline_dir, "q0f32")
