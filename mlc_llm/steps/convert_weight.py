"""convert_weight: source weights -> quantized MLC parameters (`tensor-cache.json` + `params_shard_*.bin`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..loader import open_source
from ..model import get_architecture
from ..quantization import get_quantization
from ..quantization.scheme import block_rows, quantize_q4
from ..tensor_cache import TensorCacheWriter


def make_quantizer(quant):
    dtype = np.dtype(quant.model_dtype)

    def quantize(mlc_prefix: str, w: np.ndarray) -> dict[str, np.ndarray]:
        if quant.is_group:
            q_weight, q_scale = quantize_q4(w, quant.model_dtype)
            if quant.blocked(w.shape[0]):
                q_weight, q_scale = block_rows(q_weight), block_rows(q_scale)
            return {f"{mlc_prefix}.q_weight": q_weight, f"{mlc_prefix}.q_scale": q_scale}
        return {f"{mlc_prefix}.weight": w.astype(dtype)}

    return quantize


def convert_weight(source: str, quantization: str, output: str | Path, *, install_hint: str = "",
                   progress: bool = True) -> Path:
    quant = get_quantization(quantization)
    src = open_source(source, install_hint)
    arch = get_architecture(src.model_type)
    cfg = arch.config_cls.from_hf(src.hf_config)
    norm_dtype = np.dtype(quant.model_dtype)
    groups = arch.source_to_mlc(cfg, make_quantizer(quant), src.get, src.has)
    total = 2 + 5 * cfg.num_hidden_layers + (0 if cfg.tie_word_embeddings else 1)  # groups source_to_mlc yields
    writer = TensorCacheWriter(output)
    try:
        from tqdm import tqdm

        for group in tqdm(groups, total=total, desc=f"convert {quant.name}", unit="tensor", disable=not progress):
            for name, arr in group.items():
                if arr.dtype == np.float32 and norm_dtype != np.float32:
                    arr = arr.astype(norm_dtype)  # norms etc. follow the model dtype
                writer.add(name, arr)
        return writer.finish({"quantization": quant.name, "model_type": src.model_type})
    except BaseException:
        writer.abort()
        raise
