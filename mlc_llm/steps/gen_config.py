"""gen_config: write `mlc-chat-config.json` (MLC's field names) and the tokenizer files into the output folder."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..conversation import get_conv_template
from ..loader import open_source
from ..model import check_quantization, family_for_hf
from ..quantization import get_quantization
from ..support import atomic_write_json

CHAT_CONFIG = "mlc-chat-config.json"
VERSION = "0.1.0"
_GEN_DEFAULTS = {"temperature": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                 "top_p": 1.0}


def _stop_token_ids(tokenizer_path: Path, conv, eos_id: int | None) -> list[int]:
    """Template stop ids that exist in this vocabulary, plus ids of single-token stop strings and eos."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    vocab = tok.get_vocab_size()
    ids = [i for i in conv.stop_token_ids if i < vocab and tok.id_to_token(i) in conv.stop_str]
    for s in conv.stop_str:
        enc = tok.encode(s, add_special_tokens=False).ids
        if len(enc) == 1:
            ids.append(enc[0])
    if eos_id is not None:
        ids.append(int(eos_id))
    return sorted(set(ids))


def gen_config(source: str, quantization: str, conv_template: str, output: str | Path, *,
               context_window_size: int | None = None, prefill_chunk_size: int | None = None,
               max_batch_size: int = 128, tensor_parallel_shards: int = 1, system_message: str | None = None,
               install_hint: str = "", temperature: float | None = None, top_p: float | None = None) -> Path:
    if temperature is not None and not 0 <= temperature <= 2:
        raise ValueError(f"--temperature must be in [0, 2], got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    quant = get_quantization(quantization)
    conv = get_conv_template(conv_template)
    if tensor_parallel_shards != 1:
        raise ValueError("tensor_parallel_shards > 1 is not supported: the apache-tvm wheel has no NCCL "
                         "(multi-GPU needs a TVM built from source)")
    for name, v in (("context_window_size", context_window_size), ("prefill_chunk_size", prefill_chunk_size),
                    ("max_batch_size", max_batch_size)):
        if v is not None and v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v}")
    src = open_source(source, install_hint)
    family = family_for_hf(src.hf_config)
    task = family.task
    check_quantization(family, quant.name)
    folder = {"folder": src.path} if task == "embedding" else {}  # sentence-transformers pooling etc.
    model_cfg = family.config(src.hf_config, context_window_size=context_window_size,
                              prefill_chunk_size=prefill_chunk_size, max_batch_size=max_batch_size, **folder)
    if system_message is not None:
        conv.system_message = system_message
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-config-", dir=out))
    try:
        files = src.write_tokenizer(tmp)
        hf = src.hf_config
        conv.stop_token_ids = _stop_token_ids(tmp / "tokenizer.json", conv, hf.get("eos_token_id")) \
            if "tokenizer.json" in files else conv.stop_token_ids
        gen = {**_GEN_DEFAULTS, **{k: v for k, v in src.generation_config().items() if k in _GEN_DEFAULTS}}
        gen.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
        chat_config: dict[str, Any] = {
            "version": VERSION,
            "model_type": family.name,
            "quantization": quant.name,
            "model_config": model_cfg.asdict(),
            "vocab_size": model_cfg.vocab_size,
            "context_window_size": model_cfg.context_window_size,
            "sliding_window_size": -1,
            "prefill_chunk_size": model_cfg.prefill_chunk_size,
            "attention_sink_size": -1,
            "tensor_parallel_shards": tensor_parallel_shards,
            "pipeline_parallel_stages": 1,
            "active_vocab_size": model_cfg.vocab_size,
            **gen,
            "tokenizer_files": files,
            "tokenizer_info": {"token_postproc_method": "byte_level", "prepend_space_in_encode": False,
                               "strip_space_in_decode": False},
            "conv_template": conv.to_dict() if task == "chat" else None,
            "pad_token_id": hf.get("pad_token_id") or 0,
            "bos_token_id": hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
            "eos_token_id": hf.get("eos_token_id") if hf.get("eos_token_id") is not None else 2,
            "model_task": task,
            "source": {"kind": src.kind, "path": src.path},
        }
        if task == "embedding":  # the original's field: how `encode`'s output becomes the embedding
            chat_config["embedding_metadata"] = {"model_type": "encoder", "pooling_strategy": model_cfg.pooling,
                                                 "normalize": model_cfg.normalize}
        for name in files:
            shutil.move(str(tmp / name), out / name)
        atomic_write_json(out / CHAT_CONFIG, chat_config)  # last: marks the step complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / CHAT_CONFIG


def read_chat_config(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / CHAT_CONFIG
    if not p.exists():
        raise FileNotFoundError(f"no {CHAT_CONFIG} in '{model_dir}' (run `mlc_llm gen_config` first)")
    with open(p, encoding="utf-8") as f:
        return json.load(f)
