"""EngineConfig: KV-cache capacity and batching limits, derived per mode as in MLC (MLC_REFERENCE.md §6).

Explicit values always win; the rest follow from the mode, the library's compile-time bounds, and the memory of the
device (GPU memory, or available RAM on CPU) × gpu_memory_utilization.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .speculative import MAX_DRAFT_LENGTH, MODES as SPEC_MODES

MODES = ("local", "interactive", "server")
# Where tokens are drawn: "device" runs the library's sampling functions next to the logits (only token ids cross to
# the host), "host" copies the logits and samples in numpy, "auto" is device on GPUs and host on the CPU.
SAMPLERS = ("auto", "host", "device")
PREFIX_CACHE_MODES = ("radix", "disable")
_STRING_FIELDS = ("sampler", "prefix_cache_mode", "speculative_mode")
PAGE_SIZE = 16
_ALIASES = {"max_total_seq_length": "max_total_sequence_length", "max_single_seq_length": "max_single_sequence_length",
            "max_batch_size": "max_num_sequence"}


@dataclass
class EngineConfig:
    mode: str = "local"
    max_num_sequence: Optional[int] = None
    max_total_sequence_length: Optional[int] = None
    max_single_sequence_length: Optional[int] = None
    prefill_chunk_size: Optional[int] = None
    gpu_memory_utilization: float = 0.85
    kv_cache_page_size: int = PAGE_SIZE
    tensor_parallel_shards: Optional[int] = None
    sampler: str = "auto"
    # While other requests run or wait, one prompt's prefill chunk is capped at this many tokens (vLLM's name), so a
    # short request is answered between the chunks of a long one. None: 512 on the CPU (where a prefill chunk is
    # slow), prefill_chunk_size elsewhere.
    long_prefill_token_threshold: Optional[int] = None
    # Prefix cache (MLC's names): "radix" keeps finished sequences' KV and lets new requests fork the longest cached
    # prefix; at most prefix_cache_max_num_recycling_seqs finished sequences are kept (None: max_num_sequence, -1: no
    # limit), evicted LRU when pages are needed.
    prefix_cache_mode: str = "radix"
    prefix_cache_max_num_recycling_seqs: Optional[int] = None
    # Speculative decoding: "ngram" drafts from the sequence's own earlier tokens (prompt lookup), "small_draft" from a
    # draft model; verified by the model in one batch_verify call. spec_draft_length N: N drafts every step; 0 or None
    # (MLC's "auto"): up to 4, and only while the measured step times and acceptance say it is faster.
    speculative_mode: str = "disable"
    spec_draft_length: Optional[int] = None
    # "small_draft": the draft model, "DIR" or "DIR,LIB" (MLC's --additional-models); it must share the tokenizer
    additional_models: Optional[list[str]] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown engine mode '{self.mode}' (allowed: {', '.join(MODES)})")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{self.sampler}' (allowed: {', '.join(SAMPLERS)})")
        for name in ("max_num_sequence", "max_total_sequence_length", "max_single_sequence_length",
                     "prefill_chunk_size", "long_prefill_token_threshold"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.prefix_cache_mode not in PREFIX_CACHE_MODES:
            raise ValueError(f"unknown prefix_cache_mode '{self.prefix_cache_mode}' (allowed: "
                             f"{', '.join(PREFIX_CACHE_MODES)})")
        v = self.prefix_cache_max_num_recycling_seqs
        if v is not None and (not isinstance(v, int) or v < -1):
            raise ValueError(f"prefix_cache_max_num_recycling_seqs must be an integer >= -1, got {v!r}")
        if self.speculative_mode not in SPEC_MODES:
            raise ValueError(f"unknown speculative_mode '{self.speculative_mode}' (allowed: {', '.join(SPEC_MODES)})")
        drafts = list(self.additional_models or [])
        if self.speculative_mode == "small_draft" and len(drafts) != 1:
            raise ValueError("speculative_mode 'small_draft' needs one draft model (additional_models / "
                             f"--additional-models DIR[,LIB]), got {len(drafts)}")
        if drafts and self.speculative_mode != "small_draft":
            raise ValueError("additional_models are draft models for speculative_mode 'small_draft', not for "
                             f"'{self.speculative_mode}'")
        v = self.spec_draft_length
        if v is not None and (not isinstance(v, int) or not 0 <= v <= MAX_DRAFT_LENGTH):
            raise ValueError(f"spec_draft_length must be an integer in [0, {MAX_DRAFT_LENGTH}] (0: auto), got {v!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tensor_parallel_shards not in (None, 1):
            raise ValueError("tensor_parallel_shards > 1 is not supported: the apache-tvm wheel has no NCCL "
                             "(multi-GPU needs a TVM built from source)")

    def with_overrides(self, overrides: str | None) -> "EngineConfig":
        """'max_num_sequence=32;max_total_seq_length=4096' -> a copy with those fields set."""
        if not overrides:
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for item in filter(None, (s.strip() for s in overrides.split(";"))):
            key, sep, raw = item.partition("=")
            key = _ALIASES.get(key.strip(), key.strip())
            if not sep or key not in fields or key == "mode":
                allowed = sorted(set(fields) - {"mode"} | set(_ALIASES))
                raise ValueError(f"bad override '{item}' (allowed keys: {', '.join(allowed)})")
            if key in _STRING_FIELDS:
                values[key] = raw.strip()
                continue
            if key == "additional_models":  # one draft model: "DIR" or "DIR,LIB"
                values[key] = [raw.strip()]
                continue
            try:
                values[key] = float(raw) if key == "gpu_memory_utilization" else int(raw)
            except ValueError:
                raise ValueError(f"override {key}: '{raw}' is not a number") from None
        return dataclasses.replace(self, **values)


def available_memory_bytes(device_kind: str) -> int:
    if device_kind == "cuda":
        import tvm

        return int(tvm.cuda(0).total_global_memory)
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info["MemTotal"])


@dataclass(frozen=True)
class ResolvedConfig:
    mode: str
    max_num_sequence: int
    max_total_sequence_length: int
    max_single_sequence_length: int
    prefill_chunk_size: int
    page_size: int
    kv_bytes_per_token: int
    memory_budget_bytes: int
    sampler: str = "host"  # "host" or "device" once resolved
    long_prefill_token_threshold: int = 0  # 0: prefill_chunk_size
    prefix_cache: bool = False
    prefix_cache_max_num_recycling_seqs: int = 0  # -1: no limit
    speculative_mode: str = "disable"
    spec_draft_length: int = 0  # the most drafts per step; 0: no speculation
    spec_adaptive: bool = False  # speculate only while it is measured to be faster
    draft_model: Optional[str] = None  # small_draft: "DIR" or "DIR,LIB"


def resolve(cfg: EngineConfig, metadata: dict[str, Any], device_kind: str,
            memory_bytes: int | None = None) -> ResolvedConfig:
    kv = metadata["kv_cache"]
    dtype_bytes = 2 if kv["dtype"] in ("float16", "bfloat16") else 4
    kv_per_token = kv["num_hidden_layers"] * kv["num_key_value_heads"] * kv["head_dim"] * 2 * dtype_bytes
    param_bytes = 0
    for p in metadata["params"]:
        n = 1
        for d in p["shape"]:
            n *= d
        param_bytes += n * (2 if p["dtype"] in ("float16", "bfloat16") else 4)
    compile_ctx = int(metadata["context_window_size"])
    compile_batch = int(metadata["max_batch_size"])
    compile_chunk = int(metadata["prefill_chunk_size"])
    single = min(cfg.max_single_sequence_length or compile_ctx, compile_ctx)
    mem = memory_bytes if memory_bytes is not None else available_memory_bytes(device_kind)
    # Working buffers (logits of a prefill chunk, activations) are small next to weights and KV: keep a 10% margin.
    budget = int(mem * cfg.gpu_memory_utilization * 0.9) - param_bytes
    capacity = budget // kv_per_token
    if capacity < PAGE_SIZE:
        raise ValueError(f"not enough memory for the KV cache: {mem / 2**30:.1f} GiB × {cfg.gpu_memory_utilization}"
                         f" leaves {budget / 2**30:.2f} GiB after {param_bytes / 2**30:.2f} GiB of weights; lower "
                         "max_total_sequence_length or raise gpu_memory_utilization")
    if cfg.mode == "local":
        num_seq, total = min(4, compile_batch), min(capacity, single, 8192)
    elif cfg.mode == "interactive":
        num_seq, total = 1, min(capacity, single)
    else:
        num_seq, total = compile_batch, min(capacity, compile_batch * single)
    num_seq = cfg.max_num_sequence or num_seq
    total = cfg.max_total_sequence_length or total
    if num_seq > compile_batch:
        raise ValueError(f"max_num_sequence {num_seq} exceeds the library's compile-time max_batch_size "
                         f"{compile_batch} (rebuild with a larger model.max_batch_size)")
    chunk = cfg.prefill_chunk_size or (compile_chunk if cfg.mode == "server" else min(compile_chunk, total, single))
    if chunk > compile_chunk:
        raise ValueError(f"prefill_chunk_size {chunk} exceeds the library's compile-time prefill_chunk_size "
                         f"{compile_chunk}")
    sampler = cfg.sampler if cfg.sampler != "auto" else ("device" if device_kind != "cpu" else "host")
    long_prefill = min(cfg.long_prefill_token_threshold or (512 if device_kind == "cpu" else chunk), chunk)
    recycle = cfg.prefix_cache_max_num_recycling_seqs
    spec = cfg.speculative_mode != "disable"
    return ResolvedConfig(cfg.mode, num_seq, total, min(single, total), chunk, cfg.kv_cache_page_size, kv_per_token,
                          budget, sampler, long_prefill, prefix_cache=cfg.prefix_cache_mode == "radix",
                          prefix_cache_max_num_recycling_seqs=num_seq if recycle is None else recycle,
                          speculative_mode=cfg.speculative_mode, spec_draft_length=(cfg.spec_draft_length or 4) if spec
                          else 0, spec_adaptive=spec and not cfg.spec_draft_length,
                          draft_model=(cfg.additional_models or [None])[0])


def resolve_embedding(cfg: EngineConfig, metadata: dict[str, Any]) -> ResolvedConfig:
    """An encoder has no KV cache: max_num_sequence bounds the inputs of one `encode` call, prefill_chunk_size its
    padded tokens (at least one longest input), max_single_sequence_length the tokens of one input."""
    ctx = int(metadata["context_window_size"])
    single = min(cfg.max_single_sequence_length or ctx, ctx)
    tokens = max(cfg.prefill_chunk_size or int(metadata["prefill_chunk_size"]), single)
    num_seq = cfg.max_num_sequence or int(metadata["max_batch_size"])
    return ResolvedConfig(cfg.mode, num_seq, tokens, single, tokens, 0, 0, 0, "host")
