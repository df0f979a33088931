"""Qwen2 / Qwen2.5 (q/k/v bias) and Qwen3 (RMSNorm on each q and k head, no bias)."""
from __future__ import annotations

from typing import Any

from .base import Family, hf_values


def qwen2_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**hf_values(cfg), "attention_bias": True}


def qwen3_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    return {**hf_values(cfg), "attention_bias": bool(cfg.get("attention_bias", False)), "qk_norm": True}


QWEN2 = Family(
    name="qwen2", hf_model_types=("qwen2",), gguf_archs=("qwen2",), from_hf=qwen2_from_hf,
    presets={
        "qwen2_5_0_5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             max_position_embeddings=32768, tie_word_embeddings=True),
        "qwen2_5_7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6,
                           max_position_embeddings=32768, tie_word_embeddings=False),
    },
)

QWEN3 = Family(
    name="qwen3", hf_model_types=("qwen3",), gguf_archs=("qwen3",), from_hf=qwen3_from_hf,
    gguf_names={"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight"},
    presets={"qwen3_0_6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                                num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                                rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True)},
)
