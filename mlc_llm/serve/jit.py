"""JIT: a model folder with no library gets one compiled into a cache, keyed by everything the library depends on.

The compile runs as `python -m mlc_llm compile` in a subprocess, so the engine process never imports the compiler.
MLC_JIT_POLICY: ON (use the cache, compile when missing; default), OFF (never compile: error), REDO (always
compile), READONLY (use the cache, never write it).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

POLICIES = ("ON", "OFF", "REDO", "READONLY")


def cache_dir() -> Path:
    if os.environ.get("MLC_LLM_HOME"):
        return Path(os.environ["MLC_LLM_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlc_llm"


def _build_code_hash() -> str:
    from ..pipeline import code_hash

    return code_hash("compile")


def library_key(chat_config: dict[str, Any], device: str) -> str:
    key = {"model_type": chat_config["model_type"], "quantization": chat_config["quantization"],
           "model_config": chat_config["model_config"], "device": device, "code": _build_code_hash()}
    return hashlib.md5(json.dumps(key, sort_keys=True).encode()).hexdigest()


def jit_library(model_dir: str | Path, chat_config: dict[str, Any], device: str) -> Path:
    policy = os.environ.get("MLC_JIT_POLICY", "ON").upper()
    if policy not in POLICIES:
        raise ValueError(f"MLC_JIT_POLICY='{policy}' is not one of {', '.join(POLICIES)}")
    from tvm.base import _RUNTIME_ONLY

    if _RUNTIME_ONLY:  # e.g. the runtime-only TVM of scripts/gpu/: nothing to compile (or hash) with
        raise FileNotFoundError(
            f"no model library given for '{model_dir}', and this TVM is runtime-only (no libtvm_compiler.so), so it "
            f"cannot be compiled here: pass model_lib=... (e.g. {Path(model_dir) / 'lib'}/<device>.so built by the "
            f"pipeline)")
    lib = cache_dir() / "model_lib" / f"{library_key(chat_config, device)}.so"
    if policy in ("ON", "READONLY") and lib.exists():
        return lib
    if policy in ("OFF", "READONLY"):
        raise FileNotFoundError(
            f"no model library given and none cached at {lib}, and MLC_JIT_POLICY={policy} forbids compiling "
            f"(pass model_lib=..., or set MLC_JIT_POLICY=ON)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / "lib.so"
        r = subprocess.run([sys.executable, "-m", "mlc_llm", "compile", str(model_dir), "--device", device, "-o",
                            str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"JIT compile of '{model_dir}' failed:\n{r.stderr[-3000:]}")
        os.replace(out, lib)
    return lib
