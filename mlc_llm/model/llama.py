"""Llama (Llama 2/3/3.1, SmolLM, TinyLlama): config, nn.Module over TVM's paged KV cache, and weight-name mapping."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

# Fields of the config that the compiled library depends on; everything else here is bookkeeping.
ROPE_SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    head_dim: int = 0
    tie_word_embeddings: bool = False
    context_window_size: int = 4096
    prefill_chunk_size: int = 2048
    max_batch_size: int = 128

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type")
            if kind in (None, "default"):
                self.rope_scaling = {}
            elif kind != "llama3":
                raise ValueError(f"unsupported rope_scaling type '{kind}' for llama (supported: llama3)")
            else:
                self.rope_scaling = {k: self.rope_scaling[k] for k in ROPE_SCALING_KEYS}
        self.prefill_chunk_size = min(self.prefill_chunk_size, self.context_window_size)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], **overrides) -> "LlamaConfig":
        """Accepts old-style (top-level rope_theta / rope_scaling) and transformers-5 style (rope_parameters)."""
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = dict(cfg.get("rope_scaling") or {})
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if rope.get("rope_type") not in (None, "default"):
            scaling = {**rope, **scaling}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        ctx = cfg.get("max_position_embeddings", 4096)
        values = dict(
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            head_dim=cfg.get("head_dim") or 0,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            context_window_size=ctx,
            prefill_chunk_size=min(ctx, 8192),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def source_to_mlc(cfg: LlamaConfig, quantize: Callable[[str, np.ndarray], dict[str, np.ndarray]],
                  get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> Iterator[dict[str, np.ndarray]]:
    """Yield MLC-named parameters from HF-named source tensors, one group at a time (bounded memory).

    q/k/v are concatenated into `qkv_proj`, gate/up into `gate_up_proj`; `quantize(mlc_name, w)` turns one float
    weight into its stored tensors (e.g. `.q_weight` + `.q_scale`).
    """
    yield quantize("model.embed_tokens", get("model.embed_tokens.weight"))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        qkv = np.concatenate([get(f"{p}.self_attn.{n}_proj.weight") for n in "qkv"], axis=0)
        yield quantize(f"{p}.self_attn.qkv_proj", qkv)
        yield quantize(f"{p}.self_attn.o_proj", get(f"{p}.self_attn.o_proj.weight"))
        gate_up = np.concatenate([get(f"{p}.mlp.gate_proj.weight"), get(f"{p}.mlp.up_proj.weight")], axis=0)
        yield quantize(f"{p}.mlp.gate_up_proj", gate_up)
        yield quantize(f"{p}.mlp.down_proj", get(f"{p}.mlp.down_proj.weight"))
        yield {f"{p}.input_layernorm.weight": get(f"{p}.input_layernorm.weight"),
               f"{p}.post_attention_layernorm.weight": get(f"{p}.post_attention_layernorm.weight")}
    yield {"model.norm.weight": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        if not has("lm_head.weight"):
            raise ValueError("the model has untied embeddings (tie_word_embeddings=false) but no lm_head.weight")
        yield quantize("lm_head", get("lm_head.weight"))


def build_module(cfg: LlamaConfig, quant, target):
    """Import TVM's compiler only here: the runtime side never calls this."""
    from .llama_nn import LlamaForCausalLM

    return LlamaForCausalLM(cfg, quant, target)
