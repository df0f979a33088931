"""The BERT encoder network (model/bert.py) in tvm.relax.frontend.nn (build side only), with stock Relax ops."""
from __future__ import annotations

from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..quantization.layers import make_linear
from .bert import BertConfig


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: str):
        self.size, self.eps = size, eps
        self.weight = nn.Parameter((size,), dtype)
        self.bias = nn.Parameter((size,), dtype)

    def forward(self, x: Tensor) -> Tensor:
        return op.layer_norm(x, self.size, self.weight, self.bias, eps=self.eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig, dtype: str):
        h = cfg.hidden_size
        self.word = nn.Module()
        self.word.weight = nn.Parameter((cfg.vocab_size, h), dtype)
        self.position = nn.Module()
        self.position.weight = nn.Parameter((cfg.max_position_embeddings, h), dtype)
        self.token_type = nn.Module()
        self.token_type.weight = nn.Parameter((cfg.type_vocab_size, h), dtype)
        self.norm = LayerNorm(h, cfg.layer_norm_eps, dtype)

    def forward(self, ids: Tensor) -> Tensor:
        def compute(word: te.Tensor, pos: te.Tensor, typ: te.Tensor, x: te.Tensor):
            b, s = x.shape
            # one sentence per input: token type 0 everywhere; positions 0.. s-1 (right padding)
            return te.compute((b, s, word.shape[1]), lambda i, j, k: word[x[i, j].astype("int64"), k] + pos[j, k]
                              + typ[0, k], name="bert_embeddings")

        h = op.tensor_expr_op(compute, "bert_embeddings",
                              [self.word.weight, self.position.weight, self.token_type.weight, ids])
        return self.norm(h)


class Layer(nn.Module):
    def __init__(self, cfg: BertConfig, quant):
        h, dtype = cfg.hidden_size, quant.model_dtype
        self.heads, self.d = cfg.num_attention_heads, cfg.head_dim
        self.qkv = make_linear(quant, h, 3 * h, bias=True)
        self.attn_out = make_linear(quant, h, h, bias=True)
        self.attn_norm = LayerNorm(h, cfg.layer_norm_eps, dtype)
        self.ffn_in = make_linear(quant, h, cfg.intermediate_size, bias=True)
        self.ffn_out = make_linear(quant, cfg.intermediate_size, h, bias=True)
        self.ffn_norm = LayerNorm(h, cfg.layer_norm_eps, dtype)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv(x), (b, s, 3 * self.heads, self.d))
        q, k, v = (op.permute_dims(t, [0, 2, 1, 3]) for t in op.split(qkv, 3, axis=2))  # [b, heads, s, d]
        scores = op.matmul(q, op.permute_dims(k, [0, 1, 3, 2])) * (self.d ** -0.5) + mask_bias
        ctx = op.matmul(op.softmax(scores, axis=-1), v)
        ctx = op.reshape(op.permute_dims(ctx, [0, 2, 1, 3]), (b, s, self.heads * self.d))
        x = self.attn_norm(self.attn_out(ctx) + x)
        return self.ffn_norm(self.ffn_out(op.gelu(self.ffn_in(x))) + x)  # gelu: the exact (erf) form


def _pool(h: Tensor, mask: Tensor, how: str) -> Tensor:
    if how == "cls":
        def first(x: te.Tensor):
            return te.compute((x.shape[0], x.shape[2]), lambda i, k: x[i, 0, k], name="cls_token")

        return op.tensor_expr_op(first, "cls_token", [h])
    total = op.sum(h * op.unsqueeze(mask, -1), axis=1)  # [b, hidden]
    count = op.maximum(op.sum(mask, axis=1, keepdims=True), op.full((1, 1), 1e-9, "float32"))
    return total / count


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig, quant):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, quant.model_dtype)
        self.layers = nn.ModuleList([Layer(cfg, quant) for _ in range(cfg.num_hidden_layers)])

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """-> pooled float32 [b, hidden] (not normalised)."""
        h = self.embeddings(input_ids)
        b, s = attention_mask.shape
        # padded keys get -1e9 before the softmax (exp underflows to exactly 0)
        mask_bias = op.reshape((attention_mask - op.full((1, 1), 1.0, "float32")) * 1e9, (b, 1, 1, s))
        for layer in self.layers:
            h = layer(h, mask_bias)
        return _pool(h, attention_mask, self.cfg.pooling)

    def get_default_spec(self):
        return nn.spec.ModuleSpec.from_raw({
            "encode": {"input_ids": nn.spec.Tensor(["batch_size", "seq_len"], "int32"),
                       "attention_mask": nn.spec.Tensor(["batch_size", "seq_len"], "float32"),
                       "$": {"param_mode": "packed", "effect_mode": "none"}},
        }, self)

