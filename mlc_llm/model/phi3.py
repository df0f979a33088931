"""Phi-3 / Phi-3.5 mini: a Llama-shaped decoder whose checkpoint stores q/k/v as one `qkv_proj` and gate/up as one
`gate_up_proj` (the layout our modules use anyway)."""
from __future__ import annotations

from typing import Any

from .base import Family, hf_values, windowed_everywhere


def from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) in ("longrope", "su"):
        raise ValueError("Phi-3 long-context RoPE (longrope / su scaling, the 128k variants) is not supported; "
                         "use a 4k-context Phi-3 model")
    return windowed_everywhere(hf_values(cfg), cfg)


PHI3 = Family(
    name="phi3", hf_model_types=("phi3",), gguf_archs=("phi3",), from_hf=from_hf, fused_checkpoint=True,
    gguf_names={"attn_qkv.weight": "self_attn.qkv_proj.weight", "ffn_up.weight": "mlp.gate_up_proj.weight"},
    presets={"phi3_mini": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, vocab_size=32064, rope_theta=10000.0, rms_norm_eps=1e-5,
                               max_position_embeddings=4096, tie_word_embeddings=False)},
)
