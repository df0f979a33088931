"""Model architectures: `MODELS[model_type]` gives the config class and the weight mapping of each."""
from dataclasses import dataclass
from typing import Callable

from . import llama


@dataclass(frozen=True)
class Architecture:
    name: str
    config_cls: type
    source_to_mlc: Callable
    build_module: Callable  # (config, quantization, target) -> nn.Module (build side only)


MODELS = {
    "llama": Architecture("llama", llama.LlamaConfig, llama.source_to_mlc, llama.build_module),
}


def get_architecture(model_type: str) -> Architecture:
    try:
        return MODELS[model_type]
    except KeyError:
        raise ValueError(f"unknown model_type '{model_type}' (allowed: {', '.join(MODELS)})") from None
