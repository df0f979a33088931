"""Model architectures: a registry of decoder families, and encoders for embeddings (`bert.py`).

A family is one short file (`llama.py`, `qwen2.py`, `phi3.py`, `gemma3.py`) holding a `Family` record: its config
parsing, how its checkpoint differs from Llama's, and its `random:` presets. The network itself (`decoder.py`) and the weight mapping
(`base.py`) are shared; target-specific kernels are chosen by compiler passes, never here. Adding a family: one file
and one line in FAMILIES. An encoder (`task = "embedding"`) brings its own config, mapping and network; the functions
below dispatch on the family so that the pipeline steps treat both alike.
"""
from __future__ import annotations

from typing import Any

from . import base
from .base import DecoderConfig, Family
from .bert import BERT, BertConfig
from .gemma3 import GEMMA3
from .llama import LLAMA, MISTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA3)}
ENCODERS = {BERT.name: BERT}

__all__ = ["BertConfig", "DecoderConfig", "ENCODERS", "FAMILIES", "Family", "build_module", "config_from_dict",
           "get_family", "family_for_hf", "family_for_gguf", "hf_shapes", "model_task", "num_groups",
           "random_presets", "source_to_mlc"]


def model_task(fam) -> str:
    """"chat" for decoders, "embedding" for encoders."""
    return getattr(fam, "task", "chat")


def hf_shapes(fam, cfg, has=None) -> dict[str, tuple[int, ...]]:
    """Every tensor the family reads from an HF checkpoint, with its shape (`has`: the checkpoint's names, where
    they decide a prefix)."""
    if model_task(fam) == "embedding":
        return fam.checkpoint_shapes(cfg, has) if has is not None else fam.hf_shapes(cfg)
    return base.hf_shapes(fam, cfg)


def source_to_mlc(fam, cfg, quantize, get, has):
    if model_task(fam) == "embedding":
        return fam.source_to_mlc(cfg, quantize, get, has)
    return base.source_to_mlc(fam, cfg, quantize, get, has)


def num_groups(fam, cfg) -> int:
    return fam.num_groups(cfg) if model_task(fam) == "embedding" else base.num_groups(cfg)


def config_from_dict(fam, values: dict[str, Any]):
    """The family's config from mlc-chat-config.json's `model_config`."""
    return fam.config_from_dict(values) if model_task(fam) == "embedding" else DecoderConfig.from_dict(values)


def get_family(name: str) -> Family:
    """The family of an mlc-chat-config.json `model_type`."""
    fam = FAMILIES.get(name) or ENCODERS.get(name)
    if fam is None:
        raise ValueError(f"unknown model_type '{name}' (supported: {', '.join([*FAMILIES, *ENCODERS])})")
    return fam


def family_for_hf(config: dict[str, Any]) -> Family:
    """The family reading a Hugging Face config.json (by its `model_type`)."""
    mt = config.get("model_type")
    for fam in [*FAMILIES.values(), *ENCODERS.values()]:
        if mt in fam.hf_model_types:
            return fam
    supported = sorted(t for f in [*FAMILIES.values(), *ENCODERS.values()] for t in f.hf_model_types)
    arch = ", ".join(config.get("architectures") or []) or "?"
    raise ValueError(f"unsupported architecture: config.json model_type '{mt}' ({arch}); "
                     f"supported model_types: {', '.join(supported)}")


def family_for_gguf(arch: str | None) -> Family:
    for fam in FAMILIES.values():
        if arch in fam.gguf_archs:
            return fam
    supported = sorted(a for f in FAMILIES.values() for a in f.gguf_archs)
    raise ValueError(f"GGUF architecture '{arch}' is not supported (supported: {', '.join(supported)})")


def random_presets() -> dict[str, tuple[Family, dict[str, Any]]]:
    return {name: (fam, cfg) for fam in FAMILIES.values() for name, cfg in fam.presets.items()}


def build_module(fam, cfg, quant, target):
    """The nn.Module to compile; imports TVM's compiler, which the runtime side never needs."""
    if model_task(fam) == "embedding":
        return fam.build_module(cfg, quant, target)
    from .decoder import DecoderForCausalLM

    return DecoderForCausalLM(cfg, quant, target)
