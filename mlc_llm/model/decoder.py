"""The decoder network every family compiles to, in tvm.relax.frontend.nn (build side only).

Written with stock ops (rms_norm, silu, matmul, TVM's paged KV cache); on CPU targets the compiler swaps in the
project's kernels (compiler/cpu_kernels.py), so a new family gets them without any target code here.
"""
from __future__ import annotations

import math

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from ..quantization.layers import make_embedding, make_linear, take
from .base import DecoderConfig


def _rms_norm(size: int, eps: float, dtype: str) -> nn.Module:
    return nn.RMSNorm(size, -1, eps, bias=False, dtype=dtype)


def _rope(qkv: Tensor, positions: Tensor, theta: float, rotated_heads: int) -> Tensor:
    """Half-split RoPE with base `theta` on the first `rotated_heads` heads (q and k) of qkv [b, s, heads, d];
    positions [b * s] from the KV cache."""
    def compute(x: te.Tensor, pos: te.Tensor):
        _, s, _, d = x.shape
        half = d // 2

        def f(bi, si, hi, di):
            angle = pos[bi * s + si].astype("float32") * tirx.exp(
                (di % half).astype("float32") * tirx.const(-2.0 * math.log(theta) / int(d), "float32"))
            partner = x[bi, si, hi, (di + half) % d].astype("float32")  # rotate_half: -x2 for the first half, x1
            sign = tirx.if_then_else(di < half, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
            value = x[bi, si, hi, di].astype("float32")
            rotated = value * tirx.cos(angle) + sign * partner * tirx.sin(angle)
            return tirx.if_then_else(hi < rotated_heads, rotated, value).astype(x.dtype)

        return te.compute(x.shape, f, name="rope_by_layer")

    return op.tensor_expr_op(compute, "rope_by_layer", [qkv, positions])


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, quant, layer_id: int, kv_dtype: str):
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.sm_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.theta = cfg.layer_theta(layer_id) if cfg.rope_per_layer else None
        self.qkv_proj = make_linear(quant, cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.attention_bias)
        self.o_proj = make_linear(quant, self.hq * self.d, cfg.hidden_size)
        if cfg.qk_norm:
            self.q_norm = _rms_norm(self.d, cfg.rms_norm_eps, quant.model_dtype)
            self.k_norm = _rms_norm(self.d, cfg.rms_norm_eps, quant.model_dtype)
        self.qk_norm = cfg.qk_norm
        self.kv_dtype = kv_dtype

    def forward(self, x: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.hq + 2 * self.hkv, self.d))
        if self.qk_norm:  # per head, before RoPE
            q, k, v = op.split(qkv, [self.hq, self.hq + self.hkv], axis=2)
            qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        if self.theta is not None:
            qkv = _rope(qkv, cache.get_query_positions(b * s), self.theta, self.hq + self.hkv)
        if self.kv_dtype != qkv.dtype:  # the cache takes q, k, v and gives the output in its own dtype
            qkv = op.astype(qkv, self.kv_dtype)
        out = cache.attention_with_fused_qkv(layer_id, qkv, self.hq, sm_scale=self.sm_scale)
        if out.dtype != x.dtype:
            out = op.astype(out, x.dtype)
        return self.o_proj(op.reshape(out, (b, s, self.hq * self.d)))


class GatedMLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, quant):
        self.act = cfg.hidden_act
        self.gate_up_proj = make_linear(quant, cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = make_linear(quant, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up_proj(x), 2, axis=-1)
        act = op.silu(gate) if self.act == "silu" else op.gelu(gate, approximate="tanh")
        return self.down_proj(act * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, quant, layer_id: int, kv_dtype: str):
        dtype = quant.model_dtype
        self.input_layernorm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, quant, layer_id, kv_dtype)
        self.post_attention_layernorm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = GatedMLP(cfg, quant)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma: post_attention_layernorm normalizes the attention output, these the MLP's
            self.pre_feedforward_layernorm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.post_feedforward_layernorm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, h: Tensor, cache: PagedKVCache, layer_id: int) -> Tensor:
        if self.sandwich:
            h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cache, layer_id))
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + self.self_attn(self.input_layernorm(h), cache, layer_id)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, quant, kv_dtype: str):
        self.embed_tokens = make_embedding(quant, cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, quant, i, kv_dtype) for i in range(cfg.num_hidden_layers)])
        self.norm = _rms_norm(cfg.hidden_size, cfg.rms_norm_eps, quant.model_dtype)

    def forward(self, h: Tensor, cache: PagedKVCache) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, cache, i)
        return self.norm(h)


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: DecoderConfig, quant, target, kv_dtype: str | None = None):
        """`kv_dtype`: of the KV cache's pages (default the model's dtype); q, k, v and the attention output are cast
        to it around the cache (float16 pages of a float32 model: half the bytes a decode step reads per token)."""
        self.cfg, self.quant, self.target = cfg, quant, target
        self.dtype = quant.model_dtype
        self.kv_dtype = kv_dtype or self.dtype
        self.model = DecoderModel(cfg, quant, self.kv_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = make_linear(quant, cfg.hidden_size, cfg.vocab_size)

    def _logits(self, h: Tensor) -> Tensor:
        if self.cfg.tie_word_embeddings:
            logits = self.model.embed_tokens.lm_head(h)
        else:
            logits = self.lm_head(h)
        return logits if logits.dtype == "float32" else op.astype(logits, "float32")

    def embed(self, input_ids: Tensor) -> Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.cfg.scale_embeddings:  # Gemma: times sqrt(hidden), rounded to the model dtype first
            h = h * math.sqrt(self.cfg.hidden_size)
        return h

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache):
        h = self.model(input_embed, paged_kv_cache)

        def last_token(x: te.Tensor):
            return te.compute((1, 1, x.shape[2]), lambda b, _, k: x[b, x.shape[1] - 1, k], name="last_token")

        return self._logits(op.tensor_expr_op(last_token, "take_last_token", [h])), paged_kv_cache

    def batch_prefill(self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache):
        h = self.model(input_embeds, paged_kv_cache)
        return self._logits(take(h, logit_positions, axis=1)), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def create_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                              support_sliding_window) -> PagedKVCache:
        c = self.cfg
        # windowed layers ("mha_sliding") see only the cache's last sliding_window tokens
        kinds = ["mha_sliding" if t == "sliding" else "mha" for t in c.layer_types] if c.windowed else "mha"
        window = {"layer_sliding_window_size": c.sliding_window} if c.windowed else {}
        return TIRPagedKVCache(
            attn_kind=kinds, max_batch_size=max_batch_size, **window, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, c.num_hidden_layers]), num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NONE if c.rope_per_layer else RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta,
            rope_scaling=dict(c.rope_scaling),
            rope_ext_factors=rx.prim_value(0), rotary_dim=c.head_dim, enable_disaggregation=False,
            dtype=self.kv_dtype, target=self.target,
        )

    def get_default_spec(self):
        c, dt = self.cfg, self.dtype
        packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        kv = nn.spec.Object(object_type=PagedKVCache)
        return nn.spec.ModuleSpec.from_raw({
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), **packed},
            "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", c.hidden_size], dt), "paged_kv_cache": kv,
                        **packed},
            "batch_prefill": {"input_embeds": nn.spec.Tensor([1, "seq_len", c.hidden_size], dt),
                              "logit_positions": nn.spec.Tensor(["batch_size"], "int32"), "paged_kv_cache": kv,
                              **packed},
            "batch_decode": {"input_embeds": nn.spec.Tensor(["batch_size", 1, c.hidden_size], dt),
                             "paged_kv_cache": kv, **packed},
            "batch_verify": {"input_embeds": nn.spec.Tensor([1, "seq_len", c.hidden_size], dt),
                             "paged_kv_cache": kv, **packed},
            "create_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }, self)
