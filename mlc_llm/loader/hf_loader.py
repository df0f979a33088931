"""Hugging Face model folder: config.json + *.safetensors (sharded or not), read lazily tensor by tensor."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .base import Source, read_json

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json", "chat_template.jinja")


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """safetensors: u64 little-endian header length, JSON header, then the raw data."""
    with open(path, "rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise ValueError(f"'{path}' is not a safetensors file (too short)")
        n = int.from_bytes(size_bytes, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"'{path}' is not a safetensors file (bad header: {e})") from e
    return header, 8 + n


class HFSource(Source):
    kind = "hf"

    def __init__(self, path: str):
        self.path = path
        root = Path(path)
        self.hf_config = read_json(root / "config.json")
        self.model_type = self.hf_config.get("model_type", "llama")
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"model folder '{path}' has no *.safetensors files (only safetensors weights are read)")
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for f in files:
            header, data_start = _read_header(f)
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (f, info, data_start)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor '{name}' not found in the safetensors files of {self.path}")
        f, info, data_start = self._where[name]
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"tensor '{name}' in {f.name} has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        raw = np.memmap(f, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
        arr = raw.view(_DTYPES[dtype]).reshape(info["shape"])
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32)

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
