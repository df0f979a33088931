"""An independent float64 numpy decoder (Llama, and the options of the other families: q/k/v bias, QK-norm, GELU-tanh,
Gemma 3's windowed layers with their own RoPE base, sandwich norms and scaled embeddings),
for checking compiled logits. It shares no code with mlc_llm: it reads the stored parameters (MLC names) and decodes
int4 weights bit by bit itself."""
from __future__ import annotations

import math

import numpy as np


def dequant_q4(q_weight: np.ndarray, q_scale: np.ndarray, k: int) -> np.ndarray:
    if q_weight.ndim == 3:  # q4f32_cpu row blocks: [N/64, K/8, 64] holds row 64 b + i of the NK form at [b, :, i]
        q_weight = q_weight.transpose(0, 2, 1).reshape(-1, q_weight.shape[1])
        q_scale = q_scale.transpose(0, 2, 1).reshape(-1, q_scale.shape[1])
    n, words = q_weight.shape
    out = np.empty((n, words * 8), dtype=np.float64)
    for j in range(8):  # nibble j of each word is element 8*w + j
        out[:, j::8] = ((q_weight >> np.uint32(4 * j)) & np.uint32(15)).astype(np.float64) - 7.0
    scale = q_scale.astype(np.float64).repeat(32, axis=1)
    return (out * scale)[:, :k]


def weight(params: dict, prefix: str, k: int) -> np.ndarray:
    if f"{prefix}.weight" in params:
        return params[f"{prefix}.weight"].astype(np.float64)
    return dequant_q4(params[f"{prefix}.q_weight"], params[f"{prefix}.q_scale"], k)


def inv_freq(cfg: dict, theta: float | None = None) -> np.ndarray:
    d = cfg["head_dim"]
    freq = 1.0 / (theta or cfg["rope_theta"]) ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = cfg.get("rope_scaling") or {}
    if s.get("rope_type") == "llama3":  # as in Hugging Face's Llama 3.1 rope init
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], \
            s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > old / lo, freq / factor, freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        freq = np.where(medium, smoothed, scaled)
    return freq


def rope(x: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """x [T, H, D]; half-split rotation (rotate_half), positions 0..T-1."""
    t = np.arange(x.shape[0], dtype=np.float64)[:, None] * freq[None, :]
    cos = np.concatenate([np.cos(t), np.cos(t)], axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(t), np.sin(t)], axis=-1)[:, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


def activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert name == "silu", name
    return x / (1 + np.exp(-x))


class NumpyLlama:
    def __init__(self, params: dict, cfg: dict):
        self.cfg = cfg
        self.p = params
        h, d = cfg["hidden_size"], cfg["head_dim"]
        self.hq, self.hkv, self.d = cfg["num_attention_heads"], cfg["num_key_value_heads"], d
        self.embed = weight(params, "model.embed_tokens", h)
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            self.layers.append(dict(
                ln1=params[f"{p}.input_layernorm.weight"], ln2=params[f"{p}.post_attention_layernorm.weight"],
                qkv=weight(params, f"{p}.self_attn.qkv_proj", h),
                o=weight(params, f"{p}.self_attn.o_proj", self.hq * d),
                gate_up=weight(params, f"{p}.mlp.gate_up_proj", h),
                down=weight(params, f"{p}.mlp.down_proj", cfg["intermediate_size"]),
                qkv_bias=params.get(f"{p}.self_attn.qkv_proj.bias"),
                q_norm=params.get(f"{p}.self_attn.q_norm.weight"), k_norm=params.get(f"{p}.self_attn.k_norm.weight"),
                pre_ffn=params.get(f"{p}.pre_feedforward_layernorm.weight"),
                post_ffn=params.get(f"{p}.post_feedforward_layernorm.weight")))
            sliding = (cfg.get("layer_types") or ["full"] * cfg["num_hidden_layers"])[i] == "sliding"
            window = cfg.get("sliding_window", -1) if sliding else -1
            theta = cfg.get("rope_local_theta") if sliding and cfg.get("rope_local_theta") else None
            self.layers[-1].update(window=window, freq=inv_freq(cfg, theta))
        self.norm = params["model.norm.weight"]
        self.lm_head = self.embed if cfg["tie_word_embeddings"] else weight(params, "lm_head", h)
        self.scale = (cfg.get("query_pre_attn_scalar") or d) ** -0.5

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of one sequence: [T, vocab]."""
        eps, hq, hkv, d = self.cfg["rms_norm_eps"], self.hq, self.hkv, self.d
        t = len(tokens)
        h = self.embed[np.asarray(tokens)]
        if self.cfg.get("scale_embeddings"):
            h = h * np.float64(np.float32(math.sqrt(self.cfg["hidden_size"])))
        pos = np.arange(t)
        causal = np.where(pos[None, :] > pos[:, None], -np.inf, 0.0)
        for L in self.layers:
            mask = causal if L["window"] <= 0 else np.where(pos[:, None] - pos[None, :] >= L["window"], -np.inf, causal)
            x = rms_norm(h, L["ln1"], eps)
            qkv = x @ L["qkv"].T
            if L["qkv_bias"] is not None:
                qkv = qkv + L["qkv_bias"].astype(np.float64)
            q = qkv[:, :hq * d].reshape(t, hq, d)
            k = qkv[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d)
            if L["q_norm"] is not None:  # per head, before RoPE
                q, k = rms_norm(q, L["q_norm"], eps), rms_norm(k, L["k_norm"], eps)
            q, k = rope(q, L["freq"]), rope(k, L["freq"])
            v = qkv[:, (hq + hkv) * d:].reshape(t, hkv, d)
            group = hq // hkv
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) * self.scale + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, hq * d) @ L["o"].T
            if L["pre_ffn"] is not None:  # Gemma's sandwich: normalized attention output, norms around the MLP
                h = h + rms_norm(attn, L["ln2"], eps)
                x = rms_norm(h, L["pre_ffn"], eps)
            else:
                h = h + attn
                x = rms_norm(h, L["ln2"], eps)
            gate, up = np.split(x @ L["gate_up"].T, 2, axis=-1)
            mlp = (activation(gate, self.cfg.get("hidden_act", "silu")) * up) @ L["down"].T
            h = h + (rms_norm(mlp, L["post_ffn"], eps) if L["post_ffn"] is not None else mlp)
        return rms_norm(h, self.norm, eps) @ self.lm_head.T


def bert_embedding(w: dict, ids: list[int], heads: int, eps: float = 1e-12) -> np.ndarray:
    """sentence-transformers' BERT embedding in float64 from the checkpoint's own (Hugging Face) tensor names: token
    type 0, post-norm layers, exact (erf) GELU, mean pooling over the tokens, L2 normalisation."""
    erf = np.vectorize(math.erf)

    def norm(x, p):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x, p):
        return x @ w[p + ".weight"].astype(np.float64).T + w[p + ".bias"]

    s = len(ids)
    e = "embeddings."
    h = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][:s] + \
        w[e + "token_type_embeddings.weight"][0]
    h = norm(h.astype(np.float64), e + "LayerNorm")
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in w:
        p = f"encoder.layer.{layer}."
        q, k, v = (linear(h, p + "attention.self." + n).reshape(s, heads, -1).transpose(1, 0, 2)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(s, -1)
        h = norm(linear(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        inner = linear(h, p + "intermediate.dense")
        h = norm(linear(0.5 * inner * (1 + erf(inner / math.sqrt(2))), p + "output.dense") + h, p + "output.LayerNorm")
        layer += 1
    pooled = h.mean(0)
    return pooled / np.linalg.norm(pooled)
