"""What every decoder family shares: the config (`DecoderConfig`), the HF-name -> MLC-name weight mapping, and the
`Family` record a family file fills in. Runtime side only (numpy): TVM's compiler is imported by `decoder.py`."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALING_KEYS = {"llama3": ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                "original_max_position_embeddings")}


@dataclass
class DecoderConfig:
    """The fields the compiled library depends on (stored as `model_config` in mlc-chat-config.json)."""
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
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # RMSNorm of each q and k head before RoPE (Qwen3)
    hidden_act: str = "silu"  # of the gated MLP: act(gate) * up
    # Gemma 3: attention over the last `sliding_window` tokens on the layers marked "sliding" in `layer_types`
    # ("full" elsewhere), those layers' RoPE base, embeddings times sqrt(hidden), norms around attention and MLP
    sliding_window: int = -1
    layer_types: list[str] = field(default_factory=list)
    rope_local_theta: float = 0.0  # 0: rope_theta on every layer
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float = 0.0  # attention scale scalar^-0.5; 0: head_dim

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act '{self.hidden_act}' (supported: {', '.join(ACTIVATIONS)})")
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type")
            if kind in (None, "default"):
                self.rope_scaling = {}
            elif kind not in ROPE_SCALING_KEYS:
                raise ValueError(f"unsupported rope_scaling type '{kind}' "
                                 f"(supported: {', '.join(ROPE_SCALING_KEYS)})")
            else:
                self.rope_scaling = {k: self.rope_scaling[k] for k in ROPE_SCALING_KEYS[kind]}
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if set(self.layer_types) - {"sliding", "full"}:
            raise ValueError(f"layer_types: each entry is 'sliding' or 'full', got {sorted(set(self.layer_types))}")
        if self.windowed and self.prefill_chunk_size > self.sliding_window:
            # the KV cache masks the window only against cached pages, not inside one chunk
            self.prefill_chunk_size = self.sliding_window
        self.prefill_chunk_size = min(self.prefill_chunk_size, self.context_window_size)

    @property
    def windowed(self) -> bool:
        """Some layers attend to a window shorter than the context (else full attention is exact everywhere)."""
        return "sliding" in self.layer_types and 0 < self.sliding_window < self.context_window_size

    @property
    def rope_per_layer(self) -> bool:
        """Layers with different RoPE bases (Gemma 3): the KV cache applies one base, so the model rotates q and k."""
        local = self.rope_local_theta
        return bool(local) and local != self.rope_theta and "sliding" in self.layer_types

    def layer_theta(self, i: int) -> float:
        local = self.layer_types and self.layer_types[i] == "sliding" and self.rope_local_theta
        return self.rope_local_theta if local else self.rope_theta

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hf_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """DecoderConfig fields from a Hugging Face config.json. Accepts old-style (top-level rope_theta / rope_scaling)
    and transformers-5 style (rope_parameters)."""
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if rope.get("rope_type") not in (None, "default"):
        scaling = {**rope, **scaling}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    ctx = cfg.get("max_position_embeddings", 4096)
    return dict(
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
        hidden_act=_activation(cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"),
    )


def windowed_everywhere(values: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """A `sliding_window` on every layer (Mistral v0.1, Phi-3): the context window is capped at it, where full
    attention is exact. (TVM 0.27's KV cache fails at the first prefill when no layer is a full-attention one, and its
    whole-sequence window recycles pages per sequence, which the engine does not drive.)"""
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True) and window < values["context_window_size"]:
        values.update(context_window_size=int(window), prefill_chunk_size=min(values["prefill_chunk_size"], window))
    return values


def _activation(name: str) -> str:
    return {"gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}.get(name, name)


# The checkpoint's names inside layer i (HF names, prefix `model.layers.{i}.`). Families that store q/k/v or
# gate/up fused (Phi-3) say so in their Family record.
Q, K, V, O = (f"self_attn.{n}_proj" for n in "qkvo")
QKV, GATE, UP, GATE_UP, DOWN = "self_attn.qkv_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj", "mlp.down_proj"
NORMS = ("input_layernorm", "post_attention_layernorm")
SANDWICH_NORMS = NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # Gemma: around attention and MLP


@dataclass(frozen=True)
class Family:
    """One architecture: its name (the `model_type` of mlc-chat-config.json), the HF `model_type`s and GGUF
    `general.architecture`s it reads, and how its checkpoint differs from Llama's."""
    name: str
    hf_model_types: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]  # config.json -> DecoderConfig fields
    gguf_permuted_qk: bool = False  # llama.cpp stores llama's q/k rows permuted for its RoPE layout
    fused_checkpoint: bool = False  # q/k/v as one qkv_proj and gate/up as one gate_up_proj (Phi-3)
    gguf_names: dict[str, str] = field(default_factory=dict)  # GGUF layer names that differ from the common table
    norm_offset: float = 0.0  # RMSNorm weights stored as w - offset (folded back at conversion)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # `random:<preset>` shapes (HF config keys)
    # What the pipeline steps call on any family (an encoder, model/bert.py, answers the same):
    task: ClassVar[str] = "chat"
    quantizations: ClassVar[tuple[str, ...]] = ()  # empty: every quantization

    def config(self, hf: dict[str, Any], **overrides) -> DecoderConfig:
        values = self.from_hf(hf)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return DecoderConfig(**values)

    def config_from_dict(self, values: dict[str, Any]) -> DecoderConfig:
        return DecoderConfig.from_dict(values)

    def hf_shapes(self, cfg: DecoderConfig, has: Callable[[str], bool] | None = None) -> dict[str, tuple[int, ...]]:
        return hf_shapes(self, cfg)

    def source_to_mlc(self, cfg: DecoderConfig, quantize, get, has) -> Iterator[dict[str, np.ndarray]]:
        return source_to_mlc(self, cfg, quantize, get, has)

    def num_groups(self, cfg: DecoderConfig) -> int:
        return num_groups(cfg)

    def build_module(self, cfg: DecoderConfig, quant, target, kv_dtype: str | None = None):
        """The nn.Module to compile; imports TVM's compiler, which the runtime side never needs. `kv_dtype`: of the
        KV cache (None: the model's dtype)."""
        from .decoder import DecoderForCausalLM

        return DecoderForCausalLM(cfg, quant, target, kv_dtype)


def hf_shapes(fam: Family, cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the family's HF checkpoint with its shape (what `source_to_mlc` reads)."""
    h, inter, v, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + n + ".weight": (h,) for n in (SANDWICH_NORMS if cfg.sandwich_norms else NORMS)})
        shapes[p + O + ".weight"] = (h, hq)
        shapes[p + DOWN + ".weight"] = (h, inter)
        if fam.fused_checkpoint:
            shapes[p + QKV + ".weight"] = (hq + 2 * hkv, h)
            shapes[p + GATE_UP + ".weight"] = (2 * inter, h)
        else:
            shapes.update({p + Q + ".weight": (hq, h), p + K + ".weight": (hkv, h), p + V + ".weight": (hkv, h),
                           p + GATE + ".weight": (inter, h), p + UP + ".weight": (inter, h)})
        if cfg.attention_bias:
            shapes.update({p + Q + ".bias": (hq,), p + K + ".bias": (hkv,), p + V + ".bias": (hkv,)})
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def source_to_mlc(fam: Family, cfg: DecoderConfig, quantize: Callable[[str, np.ndarray], dict[str, np.ndarray]],
                  get: Callable[[str], np.ndarray], has: Callable[[str], bool]) -> Iterator[dict[str, np.ndarray]]:
    """Yield MLC-named parameters from HF-named source tensors, one layer part at a time (bounded memory).

    q/k/v become one `qkv_proj` (weight and bias), gate/up one `gate_up_proj`; `quantize(mlc_name, w)` turns one float
    weight into its stored tensors (e.g. `.q_weight` + `.q_scale`). Norm weights get the family's offset back."""
    def norm(name: str) -> np.ndarray:
        w = get(name)
        return w + np.float32(fam.norm_offset) if fam.norm_offset else w

    yield quantize("model.embed_tokens", get("model.embed_tokens.weight"))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if fam.fused_checkpoint:
            qkv, gate_up = get(p + QKV + ".weight"), get(p + GATE_UP + ".weight")
        else:
            qkv = np.concatenate([get(p + n + ".weight") for n in (Q, K, V)], axis=0)
            gate_up = np.concatenate([get(p + GATE + ".weight"), get(p + UP + ".weight")], axis=0)
        attn = quantize(p + QKV, qkv)
        if cfg.attention_bias:
            attn[p + QKV + ".bias"] = np.concatenate([get(p + n + ".bias") for n in (Q, K, V)]).astype(np.float32)
        yield attn
        yield quantize(p + O, get(p + O + ".weight"))
        yield quantize(p + GATE_UP, gate_up)
        yield quantize(p + DOWN, get(p + DOWN + ".weight"))
        norms = {p + n + ".weight": norm(p + n + ".weight") for n in (SANDWICH_NORMS if cfg.sandwich_norms else NORMS)}
        if cfg.qk_norm:
            norms.update({p + f"self_attn.{n}_norm.weight": norm(p + f"self_attn.{n}_norm.weight") for n in "qk"})
        yield norms
    yield {"model.norm.weight": norm("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        if not has("lm_head.weight"):
            raise ValueError("the model has untied embeddings (tie_word_embeddings=false) but no lm_head.weight")
        yield quantize("lm_head", get("lm_head.weight"))


def num_groups(cfg: DecoderConfig) -> int:
    """How many groups `source_to_mlc` yields (for progress bars)."""
    return 2 + 5 * cfg.num_hidden_layers + (0 if cfg.tie_word_embeddings else 1)
