"""MLC's parameter format: `tensor-cache.json` + `params_shard_*.bin` (raw bytes, never lossy).

Writing is atomic: shards go to a temporary folder, are moved in, and `tensor-cache.json` is moved in last, so a folder
with a `tensor-cache.json` is complete. Each shard's md5 is recorded and checked before the runtime loads it.
Numpy only: the runtime side uses this module too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CACHE_FILE = "tensor-cache.json"
LEGACY_CACHE_FILE = "ndarray-cache.json"  # name used by MLC before 2025-09; accepted when reading
SHARD_CAP = 32 * 1024 * 1024


class TensorCacheError(Exception):
    pass


def file_digest(path: Path, algorithm: str = "md5", chunk: int = 1 << 22) -> str:
    """Hex digest of a file read in chunks (weight shards: md5; model libraries: sha256)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TensorCacheWriter:
    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A stale cache file would make a half-rewritten folder look complete: drop it first.
        for stale in (self.out_dir / CACHE_FILE, self.out_dir / LEGACY_CACHE_FILE):
            stale.unlink(missing_ok=True)
        for leftover in self.out_dir.glob(".convert-*"):  # from a conversion that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=self.out_dir))
        self.shards: list[dict[str, Any]] = []
        self._pending: list[tuple[str, np.ndarray]] = []
        self._pending_bytes = 0
        self.num_params = 0
        self.num_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes >= SHARD_CAP // 2:  # a big tensor gets a shard of its own
            self._write_shard([(name, array)])
            return
        if self._pending_bytes + array.nbytes > SHARD_CAP:
            self._flush()
        self._pending.append((name, array))
        self._pending_bytes += array.nbytes

    def _flush(self) -> None:
        if self._pending:
            self._write_shard(self._pending)
            self._pending, self._pending_bytes = [], 0

    def _write_shard(self, items: list[tuple[str, np.ndarray]]) -> None:
        data_path = f"params_shard_{len(self.shards)}.bin"
        records, offset, h = [], 0, hashlib.md5()
        with open(self.tmp / data_path, "wb") as f:
            for name, arr in items:
                raw = arr.tobytes()
                f.write(raw)
                h.update(raw)
                records.append({"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "format": "raw",
                                "nbytes": len(raw), "byteOffset": offset})
                offset += len(raw)
                self.num_params += arr.size
                self.num_bytes += len(raw)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"dataPath": data_path, "format": "raw-shard", "nbytes": offset, "records": records,
                            "md5sum": h.hexdigest()})

    def finish(self, extra_metadata: dict[str, Any] | None = None) -> Path:
        self._flush()
        meta = {"ParamSize": self.num_params, "ParamBytes": self.num_bytes,
                "BitsPerParam": 8.0 * self.num_bytes / max(self.num_params, 1), **(extra_metadata or {})}
        with open(self.tmp / CACHE_FILE, "w", encoding="utf-8") as f:
            json.dump({"metadata": meta, "records": self.shards}, f, indent=1)
        keep = {s["dataPath"] for s in self.shards}
        for old in self.out_dir.glob("params_shard_*.bin"):
            if old.name not in keep:
                old.unlink()
        for shard in self.shards:
            os.replace(self.tmp / shard["dataPath"], self.out_dir / shard["dataPath"])
        os.replace(self.tmp / CACHE_FILE, self.out_dir / CACHE_FILE)  # last: marks the folder complete
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.out_dir / CACHE_FILE

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def cache_file(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    for name in (CACHE_FILE, LEGACY_CACHE_FILE):
        if (d / name).exists():
            return d / name
    raise TensorCacheError(
        f"no {CACHE_FILE} in '{d}': the weights were never converted or the conversion did not finish "
        f"(run `mlc_llm convert_weight` or the pipeline's build target)")


def read_index(model_dir: str | Path) -> dict[str, Any]:
    path = cache_file(model_dir)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise TensorCacheError(f"'{path}' is not valid JSON ({e}): convert the weights again") from e


def records_by_name(index: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each tensor's (shard file, record) in the index, by name."""
    return {r["name"]: (shard["dataPath"], r) for shard in index["records"] for r in shard["records"]}


def verify(model_dir: str | Path, check_md5: bool = True) -> dict[str, Any]:
    """Check every shard exists with the recorded size (and md5); return the index."""
    index = read_index(model_dir)
    d = Path(model_dir)
    for shard in index["records"]:
        p = d / shard["dataPath"]
        if not p.exists():
            raise TensorCacheError(f"weight shard '{p}' is missing: convert the weights again")
        if p.stat().st_size != shard["nbytes"]:
            raise TensorCacheError(
                f"weight shard '{p}' has {p.stat().st_size} bytes, expected {shard['nbytes']} (truncated or "
                f"replaced): convert the weights again")
        if check_md5 and "md5sum" in shard and file_digest(p) != shard["md5sum"]:
            raise TensorCacheError(f"weight shard '{p}' is corrupted (md5 mismatch): convert the weights again")
    return index


def load_numpy(model_dir: str | Path) -> dict[str, np.ndarray]:
    """All parameters as numpy arrays (memory-mapped), for references and tools."""
    index = read_index(model_dir)
    out = {}
    for shard in index["records"]:
        raw = np.memmap(Path(model_dir) / shard["dataPath"], dtype=np.uint8, mode="r")
        for r in shard["records"]:
            if r.get("format", "raw") != "raw":
                raise TensorCacheError(f"tensor '{r['name']}' uses encoding '{r['format']}' (only raw is read)")
            chunk = raw[r["byteOffset"]: r["byteOffset"] + r["nbytes"]]
            out[r["name"]] = chunk.view(np.dtype(r["dtype"])).reshape(r["shape"])
    return out
