"""Quantization registry and the numpy side (quantize at convert time, dequantize for references).

Int4 group quantization (MLC's `q4f16_1` / `q4f32_1`): groups of 32 along K (the input dim), per-group scale
max|w| / 7 in the model dtype, q = clamp(round(w / s + 7), 0, 14), eight nibbles per uint32, least significant first.
Weights are [N, K] ("NK"): `q_weight uint32[N, K/8]`, `q_scale [N, K/32]`.

`q4f32_cpu` stores the same numbers in 64-row blocks for the CPU kernels (`compiler/cpu_q4_blocked.py`):
`q_weight uint32[N/64, K/8, 64]`, `q_scale [N/64, K/32, 64]` (element [b, w, i] is row 64 b + i of the NK form).
`q4f32_cpu_f16scale` is `q4f32_cpu` with the scales stored as float16 (4.5 bits per weight instead of 5: a tenth
less to read per decoded token; the kernels widen them to float32, activations stay float32).
A weight whose N is not a multiple of 64 keeps the NK form (`Quantization.blocked(n)`); an embedding table is a
[vocab, hidden] weight like the others (its lookup decodes row `id` from block id // 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP_SIZE = 32
ELEMS_PER_WORD = 8  # 4-bit values per uint32
MAX_INT = 7
BLOCK_ROWS = 64  # rows per block of the q4f32_cpu layout


@dataclass(frozen=True)
class Quantization:
    name: str
    kind: str  # "none" | "group"
    model_dtype: str  # activation dtype (and the scales' unless scale_dtype says otherwise)
    bits: int = 0
    group_size: int = 0
    block_rows: int = 0  # > 0: weights with N % block_rows == 0 are stored in row blocks (see the module docstring)
    scale_dtype: str = ""  # "": model_dtype

    @property
    def is_group(self) -> bool:
        return self.kind == "group"

    @property
    def scale(self) -> str:
        """The dtype the group scales are stored in."""
        return self.scale_dtype or self.model_dtype

    def blocked(self, n: int) -> bool:
        """Whether a [n, K] weight is stored in row blocks."""
        return self.is_group and self.block_rows > 0 and n % self.block_rows == 0


QUANTIZATIONS: dict[str, Quantization] = {
    "q0f32": Quantization("q0f32", "none", "float32"),
    "q0f16": Quantization("q0f16", "none", "float16"),
    "q4f16_1": Quantization("q4f16_1", "group", "float16", bits=4, group_size=GROUP_SIZE),
    "q4f32_1": Quantization("q4f32_1", "group", "float32", bits=4, group_size=GROUP_SIZE),
    "q4f32_cpu": Quantization("q4f32_cpu", "group", "float32", bits=4, group_size=GROUP_SIZE, block_rows=BLOCK_ROWS),
    "q4f32_cpu_f16scale": Quantization("q4f32_cpu_f16scale", "group", "float32", bits=4, group_size=GROUP_SIZE,
                                       block_rows=BLOCK_ROWS, scale_dtype="float16"),
}


def get_quantization(name: str) -> Quantization:
    try:
        return QUANTIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown quantization '{name}' (allowed: {', '.join(QUANTIZATIONS)})"
        ) from None


def quantize_q4(weight: np.ndarray, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float weight -> (uint32 [N, ceil(K/32)*4], scale [N, ceil(K/32)])."""
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    groups = -(-k // GROUP_SIZE)
    if groups * GROUP_SIZE != k:  # zero-pad K to whole groups
        w = np.pad(w, ((0, 0), (0, groups * GROUP_SIZE - k)))
    wg = w.reshape(n, groups, GROUP_SIZE)
    scale = (np.abs(wg).max(axis=2) / MAX_INT).astype(scale_dtype)
    s32 = scale.astype(np.float32)[:, :, None]
    # An all-zero group has scale 0: store it as the zero point so it dequantizes to 0 exactly.
    q = np.where(s32 > 0, np.rint(wg / np.where(s32 > 0, s32, 1) + MAX_INT), MAX_INT)
    q = np.clip(q, 0, 2 * MAX_INT).astype(np.uint32).reshape(n, groups * GROUP_SIZE // ELEMS_PER_WORD, ELEMS_PER_WORD)
    shifts = (np.arange(ELEMS_PER_WORD, dtype=np.uint32) * 4)[None, None, :]
    packed = np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)
    return packed, scale


def dequantize_q4(q_weight: np.ndarray, q_scale: np.ndarray, k: int) -> np.ndarray:
    """Inverse of quantize_q4 in float32: (uint32 [N, K/8], scale [N, K/32]) -> [N, k]."""
    n = q_weight.shape[0]
    shifts = (np.arange(ELEMS_PER_WORD, dtype=np.uint32) * 4)[None, None, :]
    q = ((q_weight[:, :, None] >> shifts) & 0xF).reshape(n, -1).astype(np.float32)
    scale = np.repeat(q_scale.astype(np.float32), GROUP_SIZE, axis=1)
    return ((q - MAX_INT) * scale)[:, :k]


def block_rows(a: np.ndarray, rows: int = BLOCK_ROWS) -> np.ndarray:
    """[N, X] -> [N / rows, X, rows] (the blocked layout of q_weight and q_scale)."""
    n, x = a.shape
    if n % rows:
        raise ValueError(f"{n} rows are not a multiple of the block of {rows}")
    return np.ascontiguousarray(a.reshape(n // rows, rows, x).transpose(0, 2, 1))


def unblock_rows(a: np.ndarray) -> np.ndarray:
    """Inverse of block_rows: [N / rows, X, rows] -> [N, X]."""
    nb, x, rows = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(nb * rows, x))
