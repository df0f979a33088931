"""Compile-time layers (tvm.relax.frontend.nn) for each quantization kind.

The int4 dequantize is a separate `te` op feeding the matmul; the compiler's fusion pass
(`compiler/passes.py::FuseDequantizeMatmul`) merges the two into one kernel, so weights are decoded in registers.
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from .scheme import BLOCK_ROWS, ELEMS_PER_WORD, GROUP_SIZE, MAX_INT, Quantization


def _q4_value(qw: te.Tensor, qs: te.Tensor, n, j, dtype: str, blocked: bool):
    """Weight [n, j] from the NK (`qw[N, K/8]`) or the row-blocked (`qw[N/64, K/8, 64]`) storage."""
    if blocked:
        b, i = n // BLOCK_ROWS, n % BLOCK_ROWS
        word, scale = qw[b, j // ELEMS_PER_WORD, i], qs[b, j // GROUP_SIZE, i]
    else:
        word, scale = qw[n, j // ELEMS_PER_WORD], qs[n, j // GROUP_SIZE]
    shift = ((j % ELEMS_PER_WORD) * 4).astype("uint32")
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(15, "uint32"))
    return (nibble.astype(dtype) - tirx.const(MAX_INT, dtype)) * scale.astype(dtype)


def _dequantize(q_weight: Tensor, q_scale: Tensor, rows, k: int, dtype: str, name: str, blocked: bool) -> Tensor:
    def compute(qw: te.Tensor, qs: te.Tensor):
        return te.compute((rows, k), lambda n, j: _q4_value(qw, qs, n, j, dtype, blocked), name=name)

    return op.tensor_expr_op(compute, name, [q_weight, q_scale])


def _q4_params(quant: Quantization, rows: int, k: int) -> tuple[nn.Parameter, nn.Parameter, bool]:
    groups = -(-k // GROUP_SIZE)
    words = groups * GROUP_SIZE // ELEMS_PER_WORD
    if quant.blocked(rows):
        b = rows // BLOCK_ROWS
        return (nn.Parameter((b, words, BLOCK_ROWS), "uint32"),
                nn.Parameter((b, groups, BLOCK_ROWS), quant.scale), True)
    return nn.Parameter((rows, words), "uint32"), nn.Parameter((rows, groups), quant.scale), False


def take(x: Tensor, indices: Tensor, axis: int) -> Tensor:
    """Rows of `x`, indices clamped to its range: TVM's default "fast" take warns at every compile that
    out-of-range indices segfault (the runtime refuses such token ids before they get here)."""
    from tvm import relax

    return op.wrap_nested(relax.op.take(x._expr, indices._expr, axis, mode="clip"), "take")


def _add_bias(y: Tensor, bias: nn.Parameter | None) -> Tensor:
    return y if bias is None else op.add(y, bias)  # fused into the matmul kernel as its epilogue


class PlainLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, dtype: str, bias: bool = False):
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter((out_features, in_features), dtype)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return _add_bias(op.matmul(x, op.permute_dims(self.weight)), self.bias)


class GroupQ4Linear(nn.Module):
    """int4 weights, float bias (unquantized, as in MLC's group quantization)."""

    def __init__(self, in_features: int, out_features: int, quant: Quantization, bias: bool = False):
        self.in_features, self.out_features, self.dtype = in_features, out_features, quant.model_dtype
        self.q_weight, self.q_scale, self.blocked = _q4_params(quant, out_features, in_features)
        self.bias = nn.Parameter((out_features,), quant.model_dtype) if bias else None

    def weight(self) -> Tensor:
        return _dequantize(self.q_weight, self.q_scale, self.out_features, self.in_features, self.dtype, "dequantize",
                           self.blocked)

    def forward(self, x: Tensor) -> Tensor:
        return _add_bias(op.matmul(x, op.permute_dims(self.weight())), self.bias)


class PlainEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype: str):
        self.vocab, self.dim = vocab, dim
        self.weight = nn.Parameter((vocab, dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return take(self.weight, ids, axis=0)

    def lm_head(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.weight))


class GroupQ4Embedding(nn.Module):
    """Only the gathered rows are dequantized; the tied lm_head dequantizes inside its matmul."""

    def __init__(self, vocab: int, dim: int, quant: Quantization):
        self.vocab, self.dim, self.dtype = vocab, dim, quant.model_dtype
        self.q_weight, self.q_scale, self.blocked = _q4_params(quant, vocab, dim)

    def forward(self, ids: Tensor) -> Tensor:
        if self.blocked:  # gather and decode in one kernel: row `id` is column id % 64 of block id // 64
            def compute(qw: te.Tensor, qs: te.Tensor, idx: te.Tensor):
                return te.compute((idx.shape[0], self.dim), lambda t, j: _q4_value(
                    qw, qs, idx[t].astype("int64"), j, self.dtype, True), name="dequantize_take")

            return op.tensor_expr_op(compute, "dequantize_take", [self.q_weight, self.q_scale, ids])
        qw = take(self.q_weight, ids, axis=0)
        qs = take(self.q_scale, ids, axis=0)
        return _dequantize(qw, qs, ids.shape[0], self.dim, self.dtype, "dequantize_take", False)

    def lm_head(self, x: Tensor) -> Tensor:
        w = _dequantize(self.q_weight, self.q_scale, self.vocab, self.dim, self.dtype, "dequantize", self.blocked)
        return op.matmul(x, op.permute_dims(w))


def make_linear(q: Quantization, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    if q.is_group:
        return GroupQ4Linear(in_features, out_features, q, bias)
    return PlainLinear(in_features, out_features, q.model_dtype, bias)


def make_embedding(q: Quantization, vocab: int, dim: int) -> nn.Module:
    if q.is_group:
        return GroupQ4Embedding(vocab, dim, q)
    return PlainEmbedding(vocab, dim, q.model_dtype)
