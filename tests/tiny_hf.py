"""Write a tiny random-weight Llama as a Hugging Face folder (safetensors written by hand, bf16 included)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from mlc_llm.loader.random_loader import RandomSource

TINY_LLAMA31 = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5, max_position_embeddings=256,
                    tie_word_embeddings=False)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], bf16: set[str] = frozenset()) -> None:
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        if name in bf16:  # round-to-nearest-even to the top 16 bits
            bits = arr.astype(np.float32).view(np.uint32)
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
            dtype = "BF16"
        else:
            raw, dtype = arr.astype(np.float32).tobytes(), "F32"
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_tiny_hf(folder: Path, new_style: bool = True, bf16: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **TINY_LLAMA31}
    if new_style:  # transformers 5: rope under rope_parameters
        cfg["rope_parameters"] = {"rope_theta": 10000.0, **LLAMA31_ROPE}
    else:
        cfg["rope_theta"] = 10000.0
        cfg["rope_scaling"] = dict(LLAMA31_ROPE)
    src = RandomSource("tiny", seed=7, config=dict(TINY_LLAMA31))
    tensors = {name: src.get(name) for name in src._shapes}
    names = sorted(tensors)
    half = len(names) // 2
    write_safetensors(folder / "model-00001-of-00002.safetensors", {n: tensors[n] for n in names[:half]},
                      bf16={n for n in names[:half] if bf16 and "mlp" in n})
    write_safetensors(folder / "model-00002-of-00002.safetensors", {n: tensors[n] for n in names[half:]})
    (folder / "config.json").write_text(json.dumps(cfg))
    src.write_tokenizer(folder)
    return tensors


# Tiny shapes of each family (HF config.json keys); head_dim 16, intermediate a multiple of 64 (the CPU kernels' rows)
TINY_FAMILIES = {
    "llama": dict(TINY_LLAMA31, rope_theta=10000.0),
    "mistral": dict(TINY_LLAMA31, rope_theta=1000000.0, sliding_window=None),
    "qwen2": dict(TINY_LLAMA31, intermediate_size=192, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True),
    "qwen3": dict(TINY_LLAMA31, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "phi3": dict(TINY_LLAMA31, num_key_value_heads=4, rope_theta=10000.0),
    # a 16-token window on layers 0 and 2, their own RoPE base; prompts past the window test it
    "gemma3_text": dict(TINY_LLAMA31, num_hidden_layers=3, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6,
                        tie_word_embeddings=True, sliding_window=16, rope_local_base_freq=10000.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh"),
}


def write_tiny_family(folder: Path, model_type: str, **extra) -> dict:
    """A tiny random model of `model_type` as an HF folder (the family's own tensor names); returns its config."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": model_type, **TINY_FAMILIES[model_type], **extra}
    src = RandomSource(model_type, seed=11, config=dict(cfg))
    write_safetensors(folder / "model.safetensors", {name: src.get(name) for name in src._shapes},
                      bf16={n for n in src._shapes if n.endswith("down_proj.weight")})
    (folder / "config.json").write_text(json.dumps(cfg))
    src.write_tokenizer(folder)
    return cfg
