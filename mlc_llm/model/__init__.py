"""Model architectures: a registry of decoder families, and encoders for embeddings (`bert.py`).

A family is one short file (`llama.py`, `qwen2.py`, `phi3.py`, `gemma3.py`) holding a `Family` record: its config
parsing, how its checkpoint differs from Llama's, and its `random:` presets. The network itself (`decoder.py`) and the weight mapping
(`base.py`) are shared; target-specific kernels are chosen by compiler passes, never here. Adding a family: one file
and one line in FAMILIES. An encoder (`task = "embedding"`, in ENCODERS) brings its own config, mapping and network
behind the same methods as a `Family` (config, config_from_dict, hf_shapes, source_to_mlc, num_groups, build_module),
so the pipeline steps treat both alike.
"""
from __future__ import annotations

from typing import Any

from .base import DecoderConfig, Family, hf_shapes
from .bert import BERT, BertConfig
from .gemma3 import GEMMA3
from .llama import LLAMA, MISTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA3)}
ENCODERS = {BERT.name: BERT}

__all__ = ["BertConfig", "DecoderConfig", "ENCODERS", "FAMILIES", "Family", "check_quantization", "get_family",
           "family_for_hf", "family_for_gguf", "hf_shapes", "random_presets"]


def check_quantization(family, quantization: str) -> None:
    if family.quantizations and quantization not in family.quantizations:
        raise ValueError(f"quantization {quantization} is not supported for {family.name} models "
                         f"(allowed: {', '.join(family.quantizations)})")


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

