"""Hugging Face model folder: config.json + *.safetensors (sharded or not), read lazily tensor by tensor with the
`safetensors` package (memory-mapped; bfloat16 arrives as an `ml_dtypes` array and is widened to float32)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json", "chat_template.jinja")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class HFSource(Source):
    kind = "hf"

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        root = Path(path)
        self.hf_config = read_json(root / "config.json")
        self.model_type = self.hf_config.get("model_type", "")
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model folder '{path}' has no *.safetensors files (only safetensors weights are read)")
        self._files: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
                raise ValueError(f"'{f}' is not a readable safetensors file: {e}") from e
            self._files[f] = handle
            for name in handle.keys():
                self._where[name] = f

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self._files[self._where[name]].get_slice(name).get_shape()) if name in self._where else None

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor '{name}' not found in the safetensors files of {self.path}")
        f = self._where[name]
        dtype = self._files[f].get_slice(name).get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"tensor '{name}' in {f.name} has unsupported dtype {dtype}")
        return self._files[f].get_tensor(name).astype(np.float32)

    def write_tokenizer(self, dst: Path) -> list[str]:
        copied = []
        for name in TOKENIZER_FILES:
            src = Path(self.path) / name
            if src.exists():
                shutil.copyfile(src, dst / name)
                copied.append(name)
        if not copied:
            raise ValueError(f"model folder '{self.path}' has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return copied

    def generation_config(self) -> dict[str, Any]:
        p = Path(self.path) / "generation_config.json"
        return read_json(p) if p.exists() else {}
