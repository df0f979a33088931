"""compile: model folder (mlc-chat-config.json) -> model library (.so) for a device, with `_metadata` inside."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..support import atomic_write_text
from ..tensor_cache import file_digest
from .gen_config import read_chat_config

METADATA_VERSION = 1


class CompileError(Exception):
    pass


def _metadata(chat: dict[str, Any], cfg, quant, device: str, target, params,
              prefill_precision: str = "f32", decode_precision: str = "f32",
              kv_dtype: str | None = None) -> dict[str, Any]:
    return {
        "version": METADATA_VERSION,
        "model_type": chat["model_type"],
        "quantization": quant.name,
        "model_dtype": quant.model_dtype,
        "device": device,
        "target": str(target),
        "prefill_precision": prefill_precision,
        "decode_precision": decode_precision,
        "context_window_size": cfg.context_window_size,
        "prefill_chunk_size": cfg.prefill_chunk_size,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "max_batch_size": cfg.max_batch_size,
        "vocab_size": cfg.vocab_size,
        "active_vocab_size": chat.get("active_vocab_size", cfg.vocab_size),
        "hidden_size": cfg.hidden_size,
        "model_task": "chat",
        "kv_state_kind": "kv_cache",
        "kv_cache": {"num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                     "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                     "dtype": kv_dtype or quant.model_dtype, "layout": "paged", "page_size": 16,
                     "rope": "in-model per layer, half-split" if cfg.rope_per_layer else "in-cache, half-split",
                     "rope_theta": cfg.rope_theta, "rope_scaling": dict(cfg.rope_scaling),
                     "sliding_window": cfg.sliding_window if cfg.windowed else -1,
                     "layer_types": list(cfg.layer_types)},
        "params": [{"name": n, "shape": [int(d) for d in p.shape], "dtype": p.dtype} for n, p in params],
    }


def _encoder_metadata(chat: dict[str, Any], cfg, quant, device: str, target, params) -> dict[str, Any]:
    return {
        "version": METADATA_VERSION, "model_type": chat["model_type"], "quantization": quant.name,
        "model_dtype": quant.model_dtype, "device": device, "target": str(target),
        "context_window_size": cfg.context_window_size, "prefill_chunk_size": cfg.prefill_chunk_size,
        "max_batch_size": cfg.max_batch_size, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "model_task": "embedding", "kv_state_kind": "none", "pooling": cfg.pooling,
        "params": [{"name": n, "shape": [int(d) for d in p.shape], "dtype": p.dtype} for n, p in params],
    }


def _attach_metadata(mod, metadata: dict[str, Any]):
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(tvm.ir.StringImm(json.dumps(metadata, sort_keys=True)))
    return bb.get()


def check_precisions(device: str, prefill_precision: str, decode_precision: str = "f32",
                     kv_cache_dtype: str = "auto") -> None:
    """Each precision (and the KV cache dtype) is one the build knows, other than the default (the first allowed
    value) only for the CPU; int8 only on a CPU with AVX512-VNNI."""
    from ..compiler import cpu_q4_int8
    from ..config.schema import DECODE_PRECISIONS, KV_CACHE_DTYPES, PREFILL_PRECISIONS
    from ..compiler.target import make_target, parse_device

    for label, value, allowed, what in (
            ("prefill precision", prefill_precision, PREFILL_PRECISIONS, "kernels (AMX / VNNI prefill GEMMs)"),
            ("decode precision", decode_precision, DECODE_PRECISIONS, "kernels (VNNI decode GEMVs)"),
            ("kv_cache_dtype", kv_cache_dtype, KV_CACHE_DTYPES, "build")):
        if value not in allowed:
            raise CompileError(f"unknown {label} '{value}' (allowed: {', '.join(allowed)})")
        if value != allowed[0] and parse_device(device)[0] != "cpu":
            raise CompileError(f"{label} {value} is an option of the CPU {what}; device '{device}' takes "
                               f"{allowed[0]} only")
    if "int8" in (prefill_precision, decode_precision):
        target = make_target(device)
        if not cpu_q4_int8.supported(target):
            raise CompileError(f"precision int8 needs AVX512-VNNI, which this CPU ({target.attrs.get('mcpu')}) lacks "
                               "(Xeons since Cascade Lake and AMD Zen 4 have it); use f32")


def _kv_dtype(kv_cache_dtype: str, model_dtype: str, task: str) -> str | None:
    """The KV cache's dtype for `kv_cache_dtype` (checked by `check_precisions`): None for auto (the model's
    dtype)."""
    if kv_cache_dtype == "auto" or kv_cache_dtype == model_dtype:
        return None
    if task != "chat":
        raise CompileError(f"kv_cache_dtype {kv_cache_dtype}: this model ({task}) has no KV cache")
    return kv_cache_dtype


def optimized_module(model_dir: str | Path, device: str, overrides: dict[str, int] | None = None,
                     prefill_precision: str = "f32", decode_precision: str = "f32", kv_cache_dtype: str = "auto"):
    """The model as scheduled TIR + Relax, before VM lowering: (module, target). Refuses unscheduled GPU kernels.
    `prefill_precision` (CPU): "f32", "bf16" for prefill GEMMs on AMX tiles with bfloat16-rounded inputs, or "int8"
    for them on int8-quantized activations (AVX512-VNNI). `decode_precision` (CPU): "f32", or "int8" for the decode
    GEMVs on int8-quantized activations. `kv_cache_dtype` (CPU): "auto" (the model's dtype) or "float16"."""
    from ..compiler import pipeline
    from ..compiler.passes import unbound_gpu_kernels
    from ..compiler.sampling import add_sampling_functions
    from ..compiler.target import is_gpu, make_target
    from ..model import get_family
    from ..quantization import QUANTIZATIONS, get_quantization

    check_precisions(device, prefill_precision, decode_precision, kv_cache_dtype)
    chat = read_chat_config(model_dir)
    family = get_family(chat["model_type"])
    quant = get_quantization(chat["quantization"])
    if "int8" in (prefill_precision, decode_precision) and not (quant.is_group and quant.block_rows):
        blocked = ", ".join(q.name for q in QUANTIZATIONS.values() if q.is_group and q.block_rows)
        raise CompileError(f"precision int8 is a kernel of the row-blocked int4 weights ({blocked}); this model is "
                           f"{chat['quantization']}")
    cfg = family.config_from_dict({**chat["model_config"], **(overrides or {})})
    target = make_target(device)
    if quant.block_rows and is_gpu(target):
        raise CompileError(f"quantization {quant.name} stores weights in the row-blocked layout of the CPU kernels; "
                           f"use q4f16_1 (or q4f32_1) for {device}")
    kv_dtype = _kv_dtype(kv_cache_dtype, quant.model_dtype, family.task)
    model = family.build_module(cfg, quant, target, kv_dtype) if kv_dtype else family.build_module(cfg, quant, target)
    mod, params = model.export_tvm(spec=model.get_default_spec())
    if family.task == "embedding":
        metadata = _encoder_metadata(chat, cfg, quant, device, target, params)
        mod = pipeline.optimize(_attach_metadata(mod, metadata), target, prefill_precision,
                                decode_precision=decode_precision)
    else:
        metadata = _metadata(chat, cfg, quant, device, target, params, prefill_precision, decode_precision,
                             kv_dtype)
        mod = add_sampling_functions(_attach_metadata(mod, metadata), cfg.vocab_size)
        mod = pipeline.optimize(mod, target, prefill_precision, metadata["kv_cache"], decode_precision)
    if is_gpu(target):
        unbound = unbound_gpu_kernels(mod)
        if unbound:
            raise CompileError(f"{len(unbound)} kernels have no GPU schedule and would run on the host: "
                               f"{', '.join(unbound)}")
    return mod, target


def write_library_checksum(lib: Path, digest: str) -> None:
    """`<lib>.sha256`, checked by the runtime before it maps the library (a truncated or damaged .so otherwise
    crashes the process or misbehaves)."""
    atomic_write_text(lib.with_name(lib.name + ".sha256"), digest + "\n")


def compile_model(model_dir: str | Path, device: str, output: str | Path, *,
                  overrides: dict[str, int] | None = None, prefill_precision: str = "f32",
                  decode_precision: str = "f32", kv_cache_dtype: str = "auto") -> Path:
    """overrides: context_window_size / prefill_chunk_size / max_batch_size for this library only.
    prefill_precision, decode_precision, kv_cache_dtype: see `optimized_module`."""
    from ..compiler import pipeline

    mod, target = optimized_module(model_dir, device, overrides, prefill_precision, decode_precision, kv_cache_dtype)
    executable = pipeline.build(mod, target)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        # the checksum lands first: an interrupted compile leaves a mismatch (reported), never a wrong library
        write_library_checksum(out, file_digest(Path(tmp), "sha256"))
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
