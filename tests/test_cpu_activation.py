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


def test_silu_mul_refuses_sizes_it_cannot_vectorize():
    assert not cpu_activation.supported(40)
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_activation.silu_mul_kernel(40, "float32")
