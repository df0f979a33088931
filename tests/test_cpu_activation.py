"""The CPU silu(gate) * up kernel (compiler/cpu_activation.py) against float64 numpy, including the tails of the
exponent clamp, and its use by the CPU model build."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from mlc_llm.compiler import cpu_activation


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 7)])
def test_silu_mul_matches_numpy(shape):
    inter = 48
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal((*shape, 2 * inter)) * 8).astype(np.float32)
    x[0, 0, :6] = [-200, -87, -30, 0, 30, 200]  # past the clamp, near it, and large positive
    dev = tvm.cpu()
    f = tvm.compile(tvm.IRModule({"main": cpu_activation.silu_mul_kernel(inter, "float32").with_attr(
        "global_symbol", "main")}), target=tvm.target.Target.from_device(dev))["main"]
    y = tvm.runtime.tensor(np.full((*shape, inter), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x, dev), y)
    g, up = x[..., :inter].astype(np.float64), x[..., inter:].astype(np.float64)
    expected = g / (1 + np.exp(-g)) * up
    np.testing.assert_allclose(y.numpy(), expected, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7)])
def test_gelu_tanh_mul_matches_numpy(shape):
    """GELU-tanh (Gemma) as g * sigmoid(2u): against the tanh formula in float64, past the clamp both ways."""
    inter = 48
    rng = np.random.default_rng(7 + sum(shape))
    x = (rng.standard_normal((*shape, 2 * inter)) * 4).astype(np.float32)
    x[0, 0, :7] = [-200, -12, -3, 0, 0.5, 12, 200]
    dev = tvm.cpu()
    f = tvm.compile(tvm.IRModule({"main": cpu_activation.silu_mul_kernel(inter, "float32", "gelu_tanh").with_attr(
        "global_symbol", "main")}), target=tvm.target.Target.from_device(dev))["main"]
    y = tvm.runtime.tensor(np.full((*shape, inter), np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x, dev), y)
    g, up = x[..., :inter].astype(np.float64), x[..., inter:].astype(np.float64)
    expected = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * up
    # atol: where tanh saturates float64 gives exactly 0 and the sigmoid form ~1e-16
    np.testing.assert_allclose(y.numpy(), expected, rtol=5e-6, atol=1e-12)


def test_silu_mul_refuses_sizes_it_cannot_vectorize():
    assert not cpu_activation.supported(40)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_activation.silu_mul_kernel(40, "float32")


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (5, 1), (1, 37)])
def test_rms_norm_matches_numpy(shape):
    """Serial (< 4 rows) and parallel paths, decode ([b, 1, h]) and prefill ([1, s, h]) shapes."""
    hidden, eps = 80, 1e-5
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal((*shape, hidden)) * 4).astype(np.float32)
    x[0, 0] *= 1e-3  # a small row: eps matters
    w = rng.standard_normal(hidden).astype(np.float32)
    dev = tvm.cpu()
    f = tvm.compile(tvm.IRModule({"main": cpu_activation.rms_norm_kernel(hidden, eps, "float32").with_attr(
        "global_symbol", "main")}), target=tvm.target.Target.from_device(dev))["main"]
    y = tvm.runtime.tensor(np.full(x.shape, np.nan, np.float32), dev)
    f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), y)
    xd = x.astype(np.float64)
    expected = xd / np.sqrt((xd ** 2).mean(-1, keepdims=True) + eps) * w
    np.testing.assert_allclose(y.numpy(), expected, rtol=2e-6, atol=1e-6)


def test_cpu_build_uses_the_rms_norm_and_silu_kernels(tmp_path):
    from mlc_llm.steps.compile import optimized_module
    from mlc_llm.steps.gen_config import gen_config

    from .tiny_hf import write_tiny_hf

    write_tiny_hf(tmp_path / "hf")
    gen_config(str(tmp_path / "hf"), "q4f32_cpu", "chatml", tmp_path / "out")
    mod, _ = optimized_module(tmp_path / "out", "cpu")
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.startswith("rms_norm_cpu") for n in names) and any(n.startswith("silu_mul_cpu") for n in names)
    assert not any(n.startswith("rms_norm") and not n.startswith("rms_norm_cpu") for n in names), names
