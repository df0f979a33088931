"""Model architectures: a registry of decoder families.

A family is one short file (`llama.py`, `qwen2.py`, `phi3.py`, `gemma3.py`) holding a `Family` record: its config
parsing, how its checkpoint differs from Llama's, and its `random:` presets. The network itself (`decoder.py`) and the weight mapping
(`base.py`) are shared; target-specific kernels are chosen by compiler passes, never here. Adding a family: one file
and one line in FAMILIES.
"""
from __future__ import annotations

from typing import Any

from .base import DecoderConfig, Family, hf_shapes, num_groups, source_to_mlc
from .gemma3 import GEMMA3
from .llama import LLAMA, MISTRAL
from .phi3 import PHI3
from .qwen2 import QWEN2, QWEN3

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI3, GEMMA3)}

__all__ = ["DecoderConfig", "FAMILIES", "Family", "build_module", "get_family", "family_for_hf", "family_for_gguf",
           "hf_shapes", "num_groups", "random_presets", "source_to_mlc"]


def get_family(name: str) -> Family:
    """The family of an mlc-chat-config.json `model_type`."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model_type '{name}' (supported: {', '.join(FAMILIES)})") from None


def family_for_hf(config: dict[str, Any]) -> Family:
    """The family reading a Hugging Face config.json (by its `model_type`)."""
    mt = config.get("model_type")
    for fam in FAMILIES.values():
        if mt in fam.hf_model_types:
            return fam
    supported = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
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


def build_module(fam: Family, cfg: DecoderConfig, quant, target):
    """The nn.Module to compile; imports TVM's compiler, which the runtime side never needs."""
    from .decoder import DecoderForCausalLM

    return DecoderForCausalLM(cfg, quant, target)
