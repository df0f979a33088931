"""BERT encoders for embeddings (sentence-transformers models such as all-MiniLM-L6-v2).

One compiled function, `encode(input_ids [b, s], attention_mask [b, s]) -> [b, hidden]`: embeddings (word + position +
token type 0), post-norm layers with bidirectional attention over the unmasked tokens, then the pooling of the
checkpoint's `1_Pooling/config.json` (mean over unmasked tokens, or the [CLS] token). L2 normalisation (the
`Normalize` module of `modules.json`) and `dimensions` truncation run on the host. Batches are right-padded.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

POOLINGS = ("mean", "cls")


@dataclass
class BertConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    context_window_size: int = 512  # tokens per input, [CLS] and [SEP] included
    prefill_chunk_size: int = 8192  # padded tokens per forward pass
    max_batch_size: int = 128
    pooling: str = "mean"
    normalize: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unsupported pooling '{self.pooling}' (supported: {', '.join(POOLINGS)})")
        self.context_window_size = min(self.context_window_size, self.max_position_embeddings)
        self.prefill_chunk_size = max(self.prefill_chunk_size, self.context_window_size)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sentence_transformers_options(folder: str | Path) -> dict[str, Any]:
    """Pooling, normalisation and maximum input length from a sentence-transformers folder (absent files: a plain
    BERT, [CLS] pooling as in BertModel's pooler input, no normalisation, the model's position limit)."""
    root = Path(folder)

    def read(name: str) -> Any:
        p = root / name
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    modules = read("modules.json") or []
    pool_dir = next((m.get("path") for m in modules if m.get("type", "").endswith(".Pooling")), "1_Pooling")
    pool = read(f"{pool_dir}/config.json") if pool_dir else None
    out: dict[str, Any] = {"pooling": "cls", "normalize": any(m.get("type", "").endswith(".Normalize")
                                                              for m in modules)}
    if pool:
        modes = [k for k, v in pool.items() if k.startswith("pooling_mode_") and v]
        if modes not in (["pooling_mode_mean_tokens"], ["pooling_mode_cls_token"]):
            raise ValueError(f"{root / pool_dir / 'config.json'}: pooling {modes} is not supported "
                             f"(supported: pooling_mode_mean_tokens or pooling_mode_cls_token alone)")
        out["pooling"] = "mean" if modes == ["pooling_mode_mean_tokens"] else "cls"
    st = read("sentence_bert_config.json")
    if st and st.get("max_seq_length"):
        out["context_window_size"] = int(st["max_seq_length"])
    return out


class BertFamily:
    """The encoder counterpart of `base.Family` (same role in the registry, different network and task)."""
    name = "bert"
    hf_model_types = ("bert",)
    gguf_archs: tuple[str, ...] = ()
    task = "embedding"
    presets: dict[str, dict[str, Any]] = {}
    quantizations = ("q0f32",)  # a 22M-parameter encoder gains nothing from int4, and loses accuracy

    def config(self, hf: dict[str, Any], *, folder: str | Path | None = None, **overrides) -> BertConfig:
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act '{hf['hidden_act']}' for bert (supported: gelu)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported for bert")
        values = {k: hf[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "vocab_size")}
        values.update({k: hf[k] for k in ("max_position_embeddings", "type_vocab_size", "layer_norm_eps") if k in hf})
        values["context_window_size"] = values.get("max_position_embeddings", 512)
        if folder is not None:
            values.update(sentence_transformers_options(folder))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return BertConfig(**values)

    def config_from_dict(self, d: dict[str, Any]) -> BertConfig:
        return BertConfig.from_dict(d)

    @staticmethod
    def _prefix(has: Callable[[str], bool]) -> str:
        return "bert." if has("bert.embeddings.word_embeddings.weight") else ""  # BertForXxx checkpoints

    def hf_shapes(self, cfg: BertConfig, has: Callable[[str], bool] | None = None) -> dict[str, tuple[int, ...]]:
        """`has`: the checkpoint's names, which say whether they carry the `bert.` prefix."""
        prefix = self._prefix(has) if has is not None else ""
        h, inter = cfg.hidden_size, cfg.intermediate_size
        e = prefix + "embeddings."
        shapes = {e + "word_embeddings.weight": (cfg.vocab_size, h),
                  e + "position_embeddings.weight": (cfg.max_position_embeddings, h),
                  e + "token_type_embeddings.weight": (cfg.type_vocab_size, h),
                  e + "LayerNorm.weight": (h,), e + "LayerNorm.bias": (h,)}
        for i in range(cfg.num_hidden_layers):
            p = f"{prefix}encoder.layer.{i}."
            for n, (rows, cols) in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                                    ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                                    ("intermediate.dense", (inter, h)), ("output.dense", (h, inter))):
                shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (rows, cols), (rows,)
            for n in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (h,), (h,)
        return shapes

    def source_to_mlc(self, cfg: BertConfig, quantize, get: Callable[[str], np.ndarray],
                      has: Callable[[str], bool]) -> Iterator[dict[str, np.ndarray]]:
        """MLC names: `embeddings.*`, `layers.{i}.{qkv,attn_out,attn_norm,ffn_in,ffn_out,ffn_norm}.*`; q/k/v fused."""
        pre = self._prefix(has)
        e = pre + "embeddings."
        yield {"embeddings.word.weight": get(e + "word_embeddings.weight"),
               "embeddings.position.weight": get(e + "position_embeddings.weight"),
               "embeddings.token_type.weight": get(e + "token_type_embeddings.weight"),
               "embeddings.norm.weight": get(e + "LayerNorm.weight"), "embeddings.norm.bias": get(e + "LayerNorm.bias")}
        for i in range(cfg.num_hidden_layers):
            p, q = f"{pre}encoder.layer.{i}.", f"layers.{i}."
            names = [p + f"attention.self.{n}" for n in ("query", "key", "value")]
            qkv = quantize(q + "qkv", np.concatenate([get(n + ".weight") for n in names], axis=0))
            qkv[q + "qkv.bias"] = np.concatenate([get(n + ".bias") for n in names])
            yield qkv
            for mlc, hf in (("attn_out", "attention.output.dense"), ("ffn_in", "intermediate.dense"),
                            ("ffn_out", "output.dense")):
                yield {**quantize(q + mlc, get(p + hf + ".weight")), q + mlc + ".bias": get(p + hf + ".bias")}
            yield {q + f"{mlc}.{w}": get(p + f"{hf}.LayerNorm.{w}") for mlc, hf in
                   (("attn_norm", "attention.output"), ("ffn_norm", "output")) for w in ("weight", "bias")}

    def num_groups(self, cfg: BertConfig) -> int:
        return 1 + 5 * cfg.num_hidden_layers

    def build_module(self, cfg: BertConfig, quant, target):
        from .encoder import BertEncoder

        return BertEncoder(cfg, quant)


BERT = BertFamily()
