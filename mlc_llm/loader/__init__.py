"""Model sources: a GGUF file, a Hugging Face folder (safetensors), or random weights at real shapes.

Every source yields float32 numpy tensors under Hugging Face names, lazily, plus an HF-style config dict and the
tokenizer files; the model's mapping (`model/<arch>.py::source_to_mlc`) takes it from there.
"""
from .locate import SourceError, open_source, resolve_source

__all__ = ["SourceError", "open_source", "resolve_source"]
