"""Llama (Llama 2/3/3.1/3.2, SmolLM, TinyLlama) and Mistral: the reference decoder, no bias, silu MLP."""
from __future__ import annotations

from typing import Any

from .base import Family, hf_values, windowed_everywhere

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False)


def from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    return windowed_everywhere(hf_values(cfg), cfg)


LLAMA = Family(
    name="llama", hf_model_types=("llama",), gguf_archs=("llama",), from_hf=from_hf,
    gguf_permuted_qk=True,  # llama.cpp permutes llama's q/k rows (interleaved RoPE); we undo it
    presets={
        "llama3_8b": dict(LLAMA_8B, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
        "smollm2_135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=8192, tie_word_embeddings=True),
        "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                     max_position_embeddings=512, tie_word_embeddings=False),
    },
)

# Mistral 7B: Llama with its own model_type; v0.1 attends to a 4096-token sliding window on every layer.
MISTRAL = Family(
    name="mistral", hf_model_types=("mistral",), gguf_archs=(), from_hf=from_hf,
    presets={"mistral_7b": dict(LLAMA_8B, vocab_size=32768, rope_theta=1000000.0, max_position_embeddings=32768)},
)
