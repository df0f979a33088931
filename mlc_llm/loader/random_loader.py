"""Random weights at real shapes (like vLLM's `--load-format dummy`): for benchmarks and tests, no download needed."""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source


class RandomSource(Source):
    """`random:<preset>`: a preset of any family (model/<family>.py). `config` (HF config keys, with `model_type`)
    gives other shapes."""
    kind = "random"

    def __init__(self, preset: str, seed: int = 0, config: dict[str, Any] | None = None):
        from ..model import family_for_hf, random_presets

        presets = random_presets()
        if config is None:
            if preset not in presets:
                raise ValueError(f"unknown random preset '{preset}' (allowed: {', '.join(presets)})")
            fam, config = presets[preset]
            config = {"model_type": fam.hf_model_types[0], **config}
        config = {"model_type": "llama", **config}
        self.path = f"random:{preset}"
        self.model_type = config["model_type"]
        self.seed = seed
        self.hf_config = config
        fam = family_for_hf(config)
        self._shapes = fam.hf_shapes(fam.config(config))

    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    def get(self, name: str) -> np.ndarray:
        shape = self._shapes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])  # same name -> same tensor
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        if name.endswith(".bias"):
            return (0.5 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        fan_in = shape[-1]
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(fan_in**-0.5)

    def write_tokenizer(self, dst: Path) -> list[str]:
        """A byte-level tokenizer (no merges) sized to the vocabulary, so every runtime path works: bytes, then the
        chat specials, then one word per remaining id (" w300"), so that whatever a random model generates is text
        a client can count (a serving benchmark times text chunks). Encoding never produces the words."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
        specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
        size = self.hf_config["vocab_size"]
        if size < len(byte_chars) + len(specials):
            raise ValueError("random model vocab is smaller than the byte-level tokenizer (259 tokens)")
        vocab = {ch: i for i, ch in enumerate(byte_chars + specials)}
        vocab.update((f"\u0120w{i}", i) for i in range(len(vocab), size))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(specials)  # the ids above: specials are matched whole and skipped in decoding
        tok.save(str(dst / "tokenizer.json"))
        with open(dst / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump({"bos_token": None, "eos_token": "<|im_end|>"}, f)
        return ["tokenizer.json", "tokenizer_config.json"]
