"""convert_weight: source weights -> quantized MLC parameters (`tensor-cache.json` + `params_shard_*.bin`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..loader import open_source
from ..model import check_quantization, family_for_hf
from ..quantization import get_quantization
from ..quantization.scheme import block_rows, quantize_q4
from ..tensor_cache import TensorCacheWriter


def make_quantizer(quant):
    dtype = np.dtype(quant.model_dtype)

    def quantize(mlc_prefix: str, w: np.ndarray) -> dict[str, np.ndarray]:
        if quant.is_group:
            q_weight, q_scale = quantize_q4(w, quant.scale)
            if quant.blocked(w.shape[0]):
                q_weight, q_scale = block_rows(q_weight), block_rows(q_scale)
            return {f"{mlc_prefix}.q_weight": q_weight, f"{mlc_prefix}.q_scale": q_scale}
        return {f"{mlc_prefix}.weight": w.astype(dtype)}

    return quantize


def check_tensors(src, expected: dict[str, tuple[int, ...]], family: str) -> None:
    """Every tensor the family reads is in the source, at its shape: else say which one, before anything is written."""
    missing = [n for n in expected if not src.has(n)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{src.path}: tensor '{missing[0]}'{more} of the {family} architecture is missing; "
                         f"the checkpoint does not match its config")
    for name, shape in expected.items():
        got = src.shape(name)
        if got is not None and tuple(got) != tuple(shape):
            raise ValueError(f"{src.path}: tensor '{name}' has shape {list(got)}, the {family} config implies "
                             f"{list(shape)}")


def convert_weight(source: str, quantization: str, output: str | Path, *, install_hint: str = "",
                   progress: bool = True) -> Path:
    quant = get_quantization(quantization)
    src = open_source(source, install_hint)
    family = family_for_hf(src.hf_config)
    check_quantization(family, quant.name)
    cfg = family.config(src.hf_config)
    check_tensors(src, family.hf_shapes(cfg, src.has), family.name)
    norm_dtype = np.dtype(quant.model_dtype)
    groups = family.source_to_mlc(cfg, make_quantizer(quant), src.get, src.has)
    writer = TensorCacheWriter(output)
    try:
        from tqdm import tqdm

        for group in tqdm(groups, total=family.num_groups(cfg), desc=f"convert {quant.name}", unit="tensor",
                          disable=not progress):
            for name, arr in group.items():
                if arr.dtype == np.float32 and norm_dtype != np.float32:
                    arr = arr.astype(norm_dtype)  # norms etc. follow the model dtype
                writer.add(name, arr)
        return writer.finish({"quantization": quant.name, "model_type": family.name})
    except BaseException:
        writer.abort()
        raise
