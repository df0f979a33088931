from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class Source:
    """Interface of a model source (see loader/__init__.py)."""

    kind: str = ""
    path: str = ""
    model_type: str = ""  # the Hugging Face model_type (hf_config["model_type"])
    hf_config: dict[str, Any]

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The tensor's shape without reading it (None: unknown or absent)."""
        return None

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def write_tokenizer(self, dst: Path) -> list[str]:
        """Write tokenizer files into dst; return their names."""
        raise NotImplementedError

    def generation_config(self) -> dict[str, Any]:
        return {}


def read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
