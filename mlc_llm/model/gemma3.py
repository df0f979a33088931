"""Gemma 3 (text): sliding-window attention on 5 of every 6 layers with their own RoPE base, RMSNorm on q and k,
norms around both attention and MLP, GELU-tanh MLP, embeddings scaled by sqrt(hidden). Norm weights are stored as
w with the network using (1 + w): the offset is folded in at conversion (`norm_offset`)."""
from __future__ import annotations

from typing import Any

from .base import Family, hf_values

SWA_PATTERN = 6  # Gemma 3: every 6th layer is global (configs without `layer_types`, and GGUFs)


def from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    values = hf_values(cfg)
    n = values["num_hidden_layers"]
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % (cfg.get("sliding_window_pattern") or SWA_PATTERN) == 0 else "sliding_attention"
        for i in range(n)]
    rope = cfg.get("rope_parameters") or {}
    local = cfg.get("rope_local_base_freq") or (rope.get("sliding_attention") or {}).get("rope_theta") or 10000.0
    if "full_attention" in rope:  # transformers 5: one RoPE block per layer type
        values["rope_theta"] = float(rope["full_attention"].get("rope_theta", values["rope_theta"]))
        scaling = {k: v for k, v in rope["full_attention"].items() if k != "rope_theta"}
        values["rope_scaling"] = scaling if scaling.get("rope_type") not in (None, "default") else {}
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key):
            raise ValueError(f"Gemma 3 with {key} is not supported (Gemma 3 checkpoints set it to null)")
    return {**values, "qk_norm": True, "hidden_act": "gelu_tanh",
            "sliding_window": int(cfg.get("sliding_window") or 512),
            "layer_types": ["sliding" if t == "sliding_attention" else "full" for t in types],
            "rope_local_theta": float(local), "scale_embeddings": True, "sandwich_norms": True,
            "query_pre_attn_scalar": float(cfg.get("query_pre_attn_scalar") or values.get("head_dim") or 0),
            "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True))}


GEMMA3 = Family(
    name="gemma3", hf_model_types=("gemma3_text",), gguf_archs=("gemma3",), from_hf=from_hf, norm_offset=1.0,
    gguf_names={"attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
                "post_attention_norm.weight": "post_attention_layernorm.weight",
                "ffn_norm.weight": "pre_feedforward_layernorm.weight",
                "post_ffw_norm.weight": "post_feedforward_layernorm.weight"},
    presets={
        "gemma3_270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, vocab_size=262144, rope_theta=1000000.0,
                            rms_norm_eps=1e-6, max_position_embeddings=32768, sliding_window=512),
        "gemma3_4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=256, vocab_size=262208, rope_theta=1000000.0,
                          rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window=1024),
    },
)
