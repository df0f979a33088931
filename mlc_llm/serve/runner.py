"""ModelRunner: loads a model library + parameters with the TVM runtime and calls embed / prefill / decode.

Imports only `tvm.runtime` and `tvm_ffi` (a runtime-only TVM cannot import `tvm.relax`). One runner owns one set of
parameters; paged KV caches are created from it and passed to each forward, bracketed by begin/end_forward.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

# Before numpy/TVM load: OpenBLAS threads spin after any numpy matmul and stall TVM's pool, and TVM's pool
# defaults to one thread here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np  # noqa: E402
import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm.runtime.vm import VirtualMachine  # noqa: E402

from .. import tensor_cache  # noqa: E402
from ..support import atomic_write_bytes  # noqa: E402
from . import weight_arena  # noqa: E402
from .sampler import DEVICE_SAMPLING_FUNCTIONS  # noqa: E402


class RuntimeLoadError(Exception):
    pass


def _device(name: str) -> tvm.runtime.Device:
    kind = name.split(":")[0]
    if kind in ("cpu", "llvm"):
        return tvm.cpu(0)
    if kind == "cuda":
        return tvm.cuda(0)
    raise RuntimeLoadError(f"unknown device '{name}' (allowed: cpu, cuda)")


def cuda_arch() -> str:
    """The GPU's architecture for nvcc: sm_90a on Hopper (the libraries target its "a" features), sm_XY before."""
    if os.environ.get("MLC_LLM_CUDA_ARCH"):
        return os.environ["MLC_LLM_CUDA_ARCH"]
    major, minor = tvm.cuda(0).compute_version.split(".")
    return f"sm_{major}{minor}{'a' if int(major) >= 9 else ''}"


# TVM's own flags for its CUDA source (tvm.support.nvcc), which cannot run on a runtime-only TVM (it asks the
# compiler library for the current target).
NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda",
              *(f"-U__CUDA_NO_{k}__" for k in ("HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS",
                                               "BFLOAT16_CONVERSIONS", "BFLOAT162_OPERATORS",
                                               "BFLOAT162_CONVERSIONS"))]


def compile_cuda_source(code: str) -> bytes:
    """A CUDA library built on a machine without a GPU carries CUDA source, which the TVM runtime has compiled when
    the library loads: here with nvcc into a fatbin for this GPU, kept in ~/.cache/mlc_llm/cuda by the source's hash
    (a library compiles once per machine)."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        raise RuntimeLoadError("this CUDA library holds CUDA source, compiled when it loads: nvcc (the CUDA toolkit) "
                               "must be on PATH")
    arch = cuda_arch()
    from .jit import cache_dir  # the JIT's cache folder ($MLC_LLM_HOME, else ~/.cache/mlc_llm)

    cache = cache_dir() / "cuda"
    key = hashlib.sha256(f"{arch}:{' '.join(NVCC_FLAGS)}:".encode() + code.encode()).hexdigest()[:32]
    hit = cache / f"{key}.fatbin"
    if hit.exists():
        return hit.read_bytes()
    with tempfile.TemporaryDirectory(prefix="mlc-cuda-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        r = subprocess.run([nvcc, "-fatbin", *NVCC_FLAGS, "-gencode",
                            f"arch={arch.replace('sm_', 'compute_')},code={arch}", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeLoadError(f"nvcc failed on the library's CUDA source for {arch}:\n{r.stderr[-3000:]}")
        binary = out.read_bytes()
    atomic_write_bytes(hit, binary)
    return binary


def _use_our_cuda_compiler() -> None:
    import tvm.support.nvcc  # noqa: F401 - registers TVM's callback on import (an error after ours): first

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", lambda code, *_: compile_cuda_source(code),
                                 override=True)


def _verify_library(lib: Path) -> None:
    """Against the checksum `mlc_llm compile` wrote beside it (libraries from elsewhere have none and load as is)."""
    side = lib.with_name(lib.name + ".sha256")
    if side.exists() and tensor_cache.file_digest(lib, "sha256") != side.read_text().strip():
        raise RuntimeLoadError(f"model library '{lib}' is damaged or truncated (its sha256 does not match "
                               f"{side.name}): compile it again (`mlc_llm compile`, or rerun the build)")


class ModelRunner:
    def __init__(self, model_dir: str | Path, model_lib: str | Path, device: str = "cpu", verify_md5: bool = True,
                 huge_pages: Optional[bool] = None):
        self.model_dir = Path(model_dir)
        lib_path = Path(model_lib)
        if not lib_path.exists():
            raise RuntimeLoadError(f"model library '{lib_path}' does not exist (run `mlc_llm compile`)")
        _verify_library(lib_path)
        index = tensor_cache.verify(self.model_dir, check_md5=verify_md5)
        chat_path = self.model_dir / "mlc-chat-config.json"
        if not chat_path.exists():
            raise RuntimeLoadError(f"no mlc-chat-config.json in '{self.model_dir}' (run `mlc_llm gen_config`)")
        self.chat_config: dict[str, Any] = json.loads(chat_path.read_text(encoding="utf-8"))
        self.device = _device(device)
        if device.startswith("cuda"):
            _use_our_cuda_compiler()
        self.vm = VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.device)
        self.metadata: dict[str, Any] = json.loads(str(self.vm["_metadata"]()))
        self._check_params(index)
        # CPU weights in a huge-page arena (`weight_arena`; None: unless MLC_HUGE_PAGES=0), else TVM's loader
        self.arena: Optional[weight_arena.Arena] = None
        if device.split(":")[0] in ("cpu", "llvm") and (weight_arena.wanted() if huge_pages is None else huge_pages):
            self.arena = weight_arena.load(self.model_dir, index, [p["name"] for p in self.metadata["params"]])
        self.params = (tvm_ffi.convert([tvm.runtime.from_dlpack(v) for v in self.arena.views]) if self.arena
                       else self._load_params())
        self._clear_pool = tvm.get_global_func("vm.builtin.memory_manager.clear")
        self.vocab_size = int(self.metadata["vocab_size"])
        self.hidden_size = int(self.metadata["hidden_size"])
        self.dtype = self.metadata["model_dtype"]
        self.task = self.metadata.get("model_task", "chat")
        if self.task == "embedding":  # an encoder: one `encode` function, no KV cache
            self._fn, self._sample, self._kv = {"encode": self.vm["encode"]}, {}, {}
            return
        self._fn = {n: self.vm[n] for n in ("embed", "batch_prefill", "batch_decode", "batch_verify",
                                            "create_paged_kv_cache")}
        try:
            self._sample = {n: self.vm[n] for n in DEVICE_SAMPLING_FUNCTIONS}
        except (AttributeError, KeyError, RuntimeError, ValueError):  # a library compiled without them
            self._sample = {}
        self._kv = {n: tvm.get_global_func(f"vm.builtin.{n}") for n in (
            "kv_state_add_sequence", "kv_state_remove_sequence", "kv_state_fork_sequence", "kv_state_popn",
            "kv_state_begin_forward", "kv_state_end_forward", "attention_kv_cache_get_num_available_pages",
            "attention_kv_cache_get_total_sequence_length")}

    def _check_params(self, index: dict[str, Any]) -> None:
        stored = tensor_cache.records_by_name(index)
        for p in self.metadata["params"]:
            if p["name"] not in stored:
                raise RuntimeLoadError(f"parameter '{p['name']}' is missing from the weights in '{self.model_dir}': "
                                       "the library and the weights come from different models or quantizations")
            r = stored[p["name"]][1]
            if list(r["shape"]) != list(p["shape"]) or r["dtype"] != p["dtype"]:
                raise RuntimeLoadError(
                    f"parameter '{p['name']}' is {r['dtype']}{r['shape']} in the weights but the library expects "
                    f"{p['dtype']}{p['shape']}: rebuild the library or the weights")

    def _load_params(self):
        load = tvm.get_global_func("vm.builtin.tensor_cache.load")
        by_name = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")
        clear = tvm.get_global_func("vm.builtin.tensor_cache.clear")
        load(str(self.model_dir), self.device.dlpack_device_type(), self.device.index)
        params = by_name([p["name"] for p in self.metadata["params"]])
        clear()
        return params

    def release_pool(self) -> None:
        """Free the buffers TVM's pooled allocator keeps for reuse. It reuses a buffer only for the same size and
        never returns one, so every new prompt length would grow the process for good; the engine calls this after
        each prefill step on the CPU (decode steps, with few distinct sizes, keep their pooled buffers)."""
        self._clear_pool()

    # ---- KV cache -------------------------------------------------------------------------------------------------
    def create_kv_cache(self, max_batch_size: int, max_total_seq_len: int, prefill_chunk_size: int | None = None,
                        page_size: int = 16):
        chunk = prefill_chunk_size or int(self.metadata["prefill_chunk_size"])
        return self._fn["create_paged_kv_cache"](
            tvm_ffi.Shape([max_batch_size]), tvm_ffi.Shape([max_total_seq_len]), tvm_ffi.Shape([chunk]),
            tvm_ffi.Shape([page_size]), tvm_ffi.Shape([0]))

    def add_sequence(self, cache, seq_id: int) -> None:
        self._kv["kv_state_add_sequence"](cache, seq_id)

    def remove_sequence(self, cache, seq_id: int) -> None:
        self._kv["kv_state_remove_sequence"](cache, seq_id)

    def fork_sequence(self, cache, parent: int, child: int, fork_pos: int = -1) -> None:
        self._kv["kv_state_fork_sequence"](cache, parent, child, fork_pos)

    def popn(self, cache, seq_id: int, n: int) -> None:
        self._kv["kv_state_popn"](cache, seq_id, n)

    def num_available_pages(self, cache) -> int:
        return int(self._kv["attention_kv_cache_get_num_available_pages"](cache))

    # ---- forward --------------------------------------------------------------------------------------------------
    def _check_ids(self, ids: np.ndarray) -> None:
        # Out-of-range ids make `embed` read garbage or crash: refuse them here.
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")

    def embed(self, ids: Sequence[int]):
        arr = np.asarray(ids, dtype=np.int32)
        self._check_ids(arr)
        return self._fn["embed"](tvm.runtime.tensor(arr, self.device), self.params)

    def encode(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Encoder models: the pooled (not normalised) float32 [B, hidden] of a batch of inputs, right-padded here."""
        width = max(len(t) for t in token_lists)
        ids = np.zeros((len(token_lists), width), np.int32)
        mask = np.zeros((len(token_lists), width), np.float32)
        for i, t in enumerate(token_lists):
            ids[i, :len(t)], mask[i, :len(t)] = t, 1.0
        self._check_ids(ids)
        out = self._fn["encode"](tvm.runtime.tensor(ids, self.device), tvm.runtime.tensor(mask, self.device),
                                 self.params)
        return out.numpy()

    def _ragged_forward(self, fn: str, what: str, cache, seq_ids: Sequence[int],
                        token_lists: Sequence[Sequence[int]], *extra) -> np.ndarray:
        """Append each sequence's tokens in one forward of `fn` over their concatenation: fn(embeddings, *extra,
        cache, params) between begin/end_forward; its logits [rows, vocab] as numpy."""
        lengths = [len(t) for t in token_lists]
        if min(lengths) <= 0:
            raise ValueError(f"every sequence in a {what} needs at least one token")
        flat = [t for ts in token_lists for t in ts]
        emb = self.embed(flat)._create_view(tvm_ffi.Shape([1, len(flat), self.hidden_size]))
        self._kv["kv_state_begin_forward"](cache, tvm_ffi.Shape(list(seq_ids)), tvm_ffi.Shape(lengths))
        try:
            logits, _ = self._fn[fn](emb, *extra, cache, self.params)
        finally:
            self._kv["kv_state_end_forward"](cache)
        return logits.numpy()[0]

    def batch_prefill(self, cache, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Append each sequence's tokens; return the logits after the last token of each: float32 [B, vocab]."""
        positions = np.cumsum([len(t) for t in token_lists], dtype=np.int32) - 1
        return self._ragged_forward("batch_prefill", "prefill", cache, seq_ids, token_lists,
                                    tvm.runtime.tensor(positions, self.device))

    def batch_decode(self, cache, seq_ids: Sequence[int], tokens: Sequence[int], to_host: bool = True):
        """One new token per sequence; return float32 logits [B, vocab] (numpy, or with to_host=False the device
        tensor, for `sample_on_device`)."""
        emb = self.embed(tokens)
        emb = emb._create_view(tvm_ffi.Shape([len(tokens), 1, self.hidden_size]))
        self._kv["kv_state_begin_forward"](cache, tvm_ffi.Shape(list(seq_ids)), tvm_ffi.Shape([1] * len(tokens)))
        try:
            logits, _ = self._fn["batch_decode"](emb, cache, self.params)
        finally:
            self._kv["kv_state_end_forward"](cache)
        if not to_host:
            return logits._create_view(tvm_ffi.Shape([len(tokens), self.vocab_size]))
        return logits.numpy()[:, 0]

    def batch_verify(self, cache, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """Append each sequence's tokens (speculative decoding: the last sampled token and the drafts); return the
        logits after every appended token: float32 [total tokens, vocab], sequences in order."""
        return self._ragged_forward("batch_verify", "verify step", cache, seq_ids, token_lists)

    @property
    def has_device_sampler(self) -> bool:
        return bool(self._sample)

    def sample_on_device(self, logits, temperature: np.ndarray, top_p: np.ndarray,
                         uniform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Device logits [B, vocab] -> (tokens int32 [B], their logprobs float32 [B]); rows with temperature <= 0 take
        the argmax. Only these 2·B numbers are copied back."""
        if not self._sample:
            raise RuntimeLoadError("this model library has no sampling functions: recompile it (mlc_llm compile)")
        if np.all(temperature <= 0):
            tokens, logprobs = self._sample["sample_greedy"](logits)
        else:
            tokens, logprobs = self._sample["sample_top_p"](
                logits, *(tvm.runtime.tensor(np.ascontiguousarray(a, np.float32), self.device)
                          for a in (temperature, top_p, uniform)))
        return tokens.numpy(), logprobs.numpy()

    def greedy_generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        """Prefill the prompt (in chunks) and decode greedily: the minimal end-to-end runtime check."""
        chunk = int(self.metadata["prefill_chunk_size"])
        ctx = int(self.metadata["context_window_size"])
        if len(prompt) + max_new_tokens > ctx:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context window ({ctx})")
        cache = self.create_kv_cache(1, len(prompt) + max_new_tokens + 1, chunk)
        self.add_sequence(cache, 0)
        for start in range(0, len(prompt), chunk):
            logits = self.batch_prefill(cache, [0], [list(prompt[start:start + chunk])])
        out: list[int] = []
        while len(out) < max_new_tokens:
            tok = int(np.argmax(logits[0]))
            out.append(tok)
            if tok in stop_ids or len(out) == max_new_tokens:
                break
            logits = self.batch_decode(cache, [0], [tok])
        return out
