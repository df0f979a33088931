"""int4 group quantization (q4*_1): layout, rounding, packing order."""
from __future__ import annotations

import numpy as np
import pytest

from mlc_llm.quantization import get_quantization
from mlc_llm.quantization.scheme import dequantize_q4, quantize_q4


def test_packing_is_least_significant_nibble_first():
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = [-7, -6, -5, -4, -3, -2, -1, 0]  # scale 1 -> q = w + 7 = 0..7
    q, s = quantize_q4(w, "float32")
    assert s[0, 0] == 1.0
    assert q.shape == (1, 4) and q.dtype == np.uint32
    assert q[0, 0] == sum(j << (4 * j) for j in range(8))
    assert np.all(q[0, 1:] == 0x77777777)  # zeros are stored as the zero point 7


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_roundtrip_error_is_at_most_half_a_step(scale_dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    q, s = quantize_q4(w, scale_dtype)
    assert q.shape == (48, 12) and s.shape == (48, 3) and s.dtype == np.dtype(scale_dtype)
    back = dequantize_q4(q, s, 96)
    step = np.repeat(s.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-3 * step)
    # the group maximum is represented exactly (up to the scale's own rounding)
    groups = np.abs(w.reshape(48, 3, 32)).max(-1)
    np.testing.assert_allclose(s.astype(np.float32), groups / 7, rtol=1e-3 if scale_dtype == "float16" else 1e-6)


def test_k_not_a_multiple_of_the_group_is_zero_padded():
    w = np.arange(40, dtype=np.float32).reshape(1, 40)
    q, s = quantize_q4(w, "float32")
    assert q.shape == (1, 8) and s.shape == (1, 2)
    assert dequantize_q4(q, s, 40).shape == (1, 40)


def test_all_zero_groups_dequantize_to_zero():
    q, s = quantize_q4(np.zeros((2, 64), np.float32), "float16")
    assert np.all(dequantize_q4(q, s, 64) == 0)


def test_registry():
    assert get_quantization("q4f16_1").model_dtype == "float16"
    assert get_quantization("q0f32").is_group is False
    with pytest.raises(ValueError, match="unknown quantization 'q8'"):
        get_quantization("q8")


def test_f16scale_stores_float16_scales_in_row_blocks():
    """q4f32_cpu_f16scale: q4f32_cpu's words and layout, the scales rounded to float16 (activations stay float32)."""
    from mlc_llm.steps.convert_weight import make_quantizer

    w = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    f32 = make_quantizer(get_quantization("q4f32_cpu"))("l", w)
    f16 = make_quantizer(get_quantization("q4f32_cpu_f16scale"))("l", w)
    assert get_quantization("q4f32_cpu_f16scale").model_dtype == "float32"
    assert f16["l.q_scale"].dtype == np.float16 and f32["l.q_scale"].dtype == np.float32
    assert f16["l.q_scale"].shape == f32["l.q_scale"].shape == (2, 3, 64)
    np.testing.assert_array_equal(f16["l.q_scale"], f32["l.q_scale"].astype(np.float16))
    # the words differ only where the float16 scale moved a value across a rounding boundary
    assert np.mean(f16["l.q_weight"] == f32["l.q_weight"]) > 0.95
