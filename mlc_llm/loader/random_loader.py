"""Random weights at real shapes (like vLLM's `--load-format dummy`): for benchmarks and tests, no download needed."""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source

PRESETS: dict[str, dict[str, Any]] = {
    "llama3_8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "smollm2_135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=512, tie_word_embeddings=False),
}


class RandomSource(Source):
    kind = "random"

    def __init__(self, preset: str, seed: int = 0, config: dict[str, Any] | None = None):
        if config is None and preset not in PRESETS:
            raise ValueError(f"unknown random preset '{preset}' (allowed: {', '.join(PRESETS)})")
        self.path = f"random:{preset}"
        self.model_type = "llama"
        self.seed = seed
        self.hf_config = {"model_type": "llama", **(config or PRESETS[preset])}
        self._shapes = self._all_shapes()

    def _all_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.hf_config
        h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
        d = c.get("head_dim") or h // c["num_attention_heads"]
        hq, hkv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
        shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            shapes.update({
                f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (hq, h), f"{p}.self_attn.k_proj.weight": (hkv, h),
                f"{p}.self_attn.v_proj.weight": (hkv, h), f"{p}.self_attn.o_proj.weight": (h, hq),
                f"{p}.mlp.gate_proj.weight": (inter, h), f"{p}.mlp.up_proj.weight": (inter, h),
                f"{p}.mlp.down_proj.weight": (h, inter),
            })
        if not c.get("tie_word_embeddings"):
            shapes["lm_head.weight"] = (v, h)
        return shapes

    def has(self, name: str) -> bool:
        return name in self._shapes

    def get(self, name: str) -> np.ndarray:
        shape = self._shapes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])  # same name -> same tensor
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        fan_in = shape[-1]
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in**-0.5)

    def write_tokenizer(self, dst: Path) -> list[str]:
        """A byte-level tokenizer (no merges) sized to the vocabulary, so every runtime path works."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
        specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(specials)
        if tok.get_vocab_size() > self.hf_config["vocab_size"]:
            raise ValueError("random model vocab is smaller than the byte-level tokenizer (259 tokens)")
        tok.save(str(dst / "tokenizer.json"))
        with open(dst / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump({"bos_token": None, "eos_token": "<|im_end|>"}, f)
        return ["tokenizer.json", "tokenizer_config.json"]
