"""Compile-time layers (tvm.relax.frontend.nn) for each quantization kind.

The int4 dequantize is a separate `te` op feeding the matmul; the compiler's fusion pass
(`compiler/passes.py::FuseDequantizeMatmul`) merges the two into one kernel, so weights are decoded in registers.
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .scheme import ELEMS_PER_WORD, GROUP_SIZE, MAX_INT, Quantization


def _dequantize(q_weight: Tensor, q_scale: Tensor, rows, k: int, dtype: str, name: str) -> Tensor:
    def compute(qw: te.Tensor, qs: te.Tensor):
        def elem(n, j):
            word = qw[n, j // ELEMS_PER_WORD]
            shift = ((j % ELEMS_PER_WORD) * 4).astype("uint32")
            nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(15, "uint32"))
            return (nibble.astype(dtype) - tirx.const(MAX_INT, dtype)) * qs[n, j // GROUP_SIZE]

        return te.compute((rows, k), elem, name=name)

    return op.tensor_expr_op(compute, name, [q_weight, q_scale])


class PlainLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: str):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter((out_features, in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight))


class GroupQ4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: str):
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        groups = -(-in_features // GROUP_SIZE)
        self.q_weight = nn.Parameter((out_features, groups * GROUP_SIZE // ELEMS_PER_WORD), "uint32")
        self.q_scale = nn.Parameter((out_features, groups), dtype)

    def weight(self) -> Tensor:
        return _dequantize(self.q_weight, self.q_scale, self.out_features, self.in_features, self.dtype, "dequantize")

    def forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight()))


class PlainEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: str):
        self.vocab, self.dim = vocab, dim
        self.weight = nn.Parameter((vocab, dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return op.take(self.weight, ids, axis=0)

    def lm_head(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight))


class GroupQ4Embedding(nn.Module):
    """Only the gathered rows are dequantized; the tied lm_head dequantizes inside its matmul."""

    def __init__(self, vocab: int, dim: int, dtype: str):
        self.vocab, self.dim, self.dtype = vocab, dim, dtype
        groups = -(-dim // GROUP_SIZE)
        self.q_weight = nn.Parameter((vocab, groups * GROUP_SIZE // ELEMS_PER_WORD), "uint32")
        self.q_scale = nn.Parameter((vocab, groups), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        qw = op.take(self.q_weight, ids, axis=0)
        qs = op.take(self.q_scale, ids, axis=0)
        return _dequantize(qw, qs, ids.shape[0], self.dim, self.dtype, "dequantize_take")

    def lm_head(self, x: Tensor) -> Tensor:
        w = _dequantize(self.q_weight, self.q_scale, self.vocab, self.dim, self.dtype, "dequantize")
        return op.matmul(x, op.permute_dims(w))


def make_linear(q: Quantization, in_features: int, out_features: int) -> nn.Module:
    cls = GroupQ4Linear if q.is_group else PlainLinear
    return cls(in_features, out_features, q.model_dtype)


def make_embedding(q: Quantization, vocab: int, dim: int) -> nn.Module:
    cls = GroupQ4Embedding if q.is_group else PlainEmbedding
    return cls(vocab, dim, q.model_dtype)
