"""GGUF file (llama.cpp) -> float32 tensors under Hugging Face names, dequantized with the `gguf` package."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str, layer_names: dict[str, str] = _LAYER_NAMES) -> str | None:
    """The Hugging Face name of a GGUF tensor (`layer_names`: the family's table of names inside a layer)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (per head: half-split RoPE rows -> interleaved) back to HF order."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource(Source):
    kind = "gguf"

    def __init__(self, path: str):
        import gguf  # imported here: only the build side reads GGUF

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"cannot read GGUF file '{path}': {e}") from e
        from ..model import family_for_gguf

        self._dequantize = gguf.quants.dequantize
        self.meta = {k: self._field(f) for k, f in self._reader.fields.items()}
        self.arch = self.meta.get("general.architecture")
        self.family = family_for_gguf(self.arch)
        self.model_type = self.family.hf_model_types[0]
        layer_names = {**_LAYER_NAMES, **self.family.gguf_names}
        named = ((hf_name(t.name, layer_names), t) for t in self._reader.tensors)
        self._tensors = {name: t for name, t in named if name}
        self.hf_config = self._config()

    @staticmethod
    def _field(f) -> Any:
        try:
            return f.contents()
        except Exception:  # unknown field layouts are not needed
            return None

    def _config(self) -> dict[str, Any]:
        m, a = self.meta, self.arch + "."
        n_head = int(m[a + "attention.head_count"])
        hidden = int(m[a + "embedding_length"])
        # the embedding's rows (Qwen pads them past the tokenizer's tokens)
        embed = self.shape("model.embed_tokens.weight")
        vocab = embed[0] if embed else int(m.get(a + "vocab_size") or len(m["tokenizer.ggml.tokens"]))
        cfg = {
            "model_type": self.model_type,
            "hidden_size": hidden,
            "intermediate_size": int(m[a + "feed_forward_length"]),
            "num_hidden_layers": int(m[a + "block_count"]),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(m.get(a + "attention.head_count_kv") or n_head),
            "rms_norm_eps": float(m[a + "attention.layer_norm_rms_epsilon"]),
            "rope_theta": float(m.get(a + "rope.freq_base") or 10000.0),
            "max_position_embeddings": int(m[a + "context_length"]),
            "vocab_size": vocab,
            "head_dim": int(m.get(a + "attention.key_length") or hidden // n_head),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
        }
        if m.get(a + "attention.sliding_window"):
            cfg["sliding_window"] = int(m[a + "attention.sliding_window"])
        if m.get(a + "rope.scaling.type") not in (None, "none"):
            raise ValueError(f"GGUF rope scaling '{m.get(a + 'rope.scaling.type')}' is not supported")
        return cfg

    def has(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...] | None:
        t = self._tensors.get(name)
        return None if t is None else tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first

    def get(self, name: str) -> np.ndarray:
        if name not in self._tensors:
            raise KeyError(f"tensor '{name}' not found in GGUF file {self.path}")
        t = self._tensors[name]
        w = self._dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(self.shape(name))
        if self.family.norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(self.family.norm_offset)  # llama.cpp stores Gemma's norms with the offset added
        if self.family.gguf_permuted_qk:
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                w = unpermute_qk(w, self.hf_config["num_attention_heads"])
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                w = unpermute_qk(w, self.hf_config["num_key_value_heads"])
        return w

    def write_tokenizer(self, dst: Path) -> list[str]:
        from .gguf_tokenizer import build_tokenizer

        meta = {k[len("tokenizer."):]: v for k, v in self.meta.items() if k.startswith("tokenizer.")}
        tok, config = build_tokenizer(meta)
        config["model_max_length"] = self.hf_config["max_position_embeddings"]
        tok.save(str(dst / "tokenizer.json"))
        with open(dst / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return ["tokenizer.json", "tokenizer_config.json"]
