"""Random weights for a compiled model library, written where they are used: numpy and the TVM runtime only.

An 8B model's weights (4.5 GB at q4f16_1, 16 GB at q0f16) cannot travel to the lent GPU machine; its library and
config can. This reads the parameter list (names, shapes, dtypes) from the library's `_metadata` and writes a
`tensor-cache.json` + shards beside the config, in the format `convert_weight` writes:

    python scripts/gpu/random_weights.py MODEL_DIR LIB [--device cuda] [--seed 0]

Values are only for speed measurements, chosen so activations stay finite: packed int4 words are random bits with
group scales around 0.004 (weights of std ~0.02), float weights N(0, 0.02), norm weights 1. Large tensors reuse
slices of one random pool (the bytes of a benchmark weight do not matter, the time to generate 16 GB does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

POOL_BYTES = 64 << 20


def library_params(lib: str, device: str) -> list[dict]:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(lib), dev)
    return json.loads(str(vm["_metadata"]()))["params"]


class Pools:
    """Random values per kind, drawn once; a tensor is a slice starting at a random offset."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self._pools: dict[tuple[str, str], np.ndarray] = {}

    def _pool(self, kind: str, dtype: str) -> np.ndarray:
        key = (kind, dtype)
        if key not in self._pools:
            n = POOL_BYTES // np.dtype(dtype).itemsize
            if kind == "bits":
                pool = self.rng.integers(0, 2**32, n, dtype=np.uint64).astype(dtype)
            elif kind == "scale":
                pool = self.rng.uniform(0.003, 0.006, n).astype(dtype)
            else:
                pool = (self.rng.standard_normal(n, dtype=np.float32) * 0.02).astype(dtype)
            self._pools[key] = pool
        return self._pools[key]

    def tensor(self, kind: str, shape: list[int], dtype: str) -> np.ndarray:
        size = int(np.prod(shape))
        pool = self._pool(kind, dtype)
        if size <= len(pool):
            start = int(self.rng.integers(0, len(pool) - size + 1))
            return pool[start:start + size].reshape(shape)
        reps = -(-size // len(pool))
        return np.tile(pool, reps)[:size].reshape(shape)


def kind_of(name: str, dtype: str) -> str:
    if dtype.startswith("uint") or dtype.startswith("int"):
        return "bits"
    if "norm" in name:
        return "ones"
    if name.endswith("scale"):
        return "scale"
    return "normal"


def write(model_dir: Path, params: list[dict], seed: int = 0) -> dict:
    from mlc_llm.tensor_cache import TensorCacheWriter

    t0 = time.perf_counter()
    pools = Pools(seed)
    writer = TensorCacheWriter(model_dir)
    try:
        for p in params:
            kind = kind_of(p["name"], p["dtype"])
            if kind == "ones":
                arr = np.ones(p["shape"], p["dtype"])
            else:
                arr = pools.tensor(kind, p["shape"], p["dtype"])
            writer.add(p["name"], arr)
        writer.finish({"source": f"random weights (seed {seed}) for {len(params)} library parameters"})
    except BaseException:
        writer.abort()
        raise
    return {"params": len(params), "bytes": writer.num_bytes, "seconds": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("lib")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not (a.model_dir / "mlc-chat-config.json").exists():
        ap.error(f"{a.model_dir} has no mlc-chat-config.json (run gen_config where the library was compiled)")
    info = write(a.model_dir, library_params(a.lib, a.device), a.seed)
    print(f"random_weights: {info['params']} tensors, {info['bytes'] / 2**30:.2f} GiB in {info['seconds']:.1f} s "
          f"-> {a.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
