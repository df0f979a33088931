"""CPU weights in the huge-page arena (`mlc_llm/serve/weight_arena.py`): the same bytes as the tensor cache, the same
logits as TVM's loader, and TVM's loader where the arena cannot hold a record."""
from __future__ import annotations

import json
import mmap

import numpy as np
import pytest

from mlc_llm import tensor_cache
from mlc_llm.serve import weight_arena
from mlc_llm.serve.runner import ModelRunner

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")


def _cache(tmp_path, arrays: dict[str, np.ndarray]) -> dict:
    w = tensor_cache.TensorCacheWriter(tmp_path)
    for name, a in arrays.items():
        w.add(name, a)
    w.finish()
    return tensor_cache.read_index(tmp_path)


def test_arena_holds_the_cache_bytes_page_aligned(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.integers(0, 2**32, (64, 48, 64), dtype=np.uint32),
              "s": rng.random((64, 6, 64)).astype(np.float16),
              "norm": rng.random(576).astype(np.float32),
              "big": rng.random((5, 1 << 20)).astype(np.float32),  # a shard of its own (20 MB)
              "ids": np.arange(5, dtype=np.int32)}
    index = _cache(tmp_path, arrays)
    assert len(index["records"]) > 1
    names = ["norm", "big", "w", "ids", "s"]  # not the stored order
    arena = weight_arena.load(tmp_path, index, names)
    assert arena is not None and arena.address % weight_arena.HUGE == 0
    for name, view in zip(names, arena.views):
        assert view.dtype == arrays[name].dtype and view.shape == arrays[name].shape
        assert np.array_equal(view, arrays[name]), name
        assert view.ctypes.data % weight_arena.ALIGN == 0
    assert 0 <= arena.huge_page_bytes() <= arena.bytes.nbytes


def test_records_the_arena_cannot_hold_go_to_tvms_loader(tmp_path):
    index = _cache(tmp_path, {"a": np.ones(8, np.float32)})
    record = index["records"][0]["records"][0]
    assert weight_arena.load(tmp_path, index, ["a"]) is not None
    for change in ({"format": "f32-to-bf16"}, {"dtype": "bfloat16"}, {"nbytes": 16}):
        edited = json.loads(json.dumps(index))
        edited["records"][0]["records"][0].update(change)
        assert weight_arena.load(tmp_path, edited, ["a"]) is None, change
    assert record["format"] == "raw"


def test_a_truncated_shard_is_an_error(tmp_path):
    index = _cache(tmp_path, {"a": np.ones(1024, np.float32)})
    shard = tmp_path / index["records"][0]["dataPath"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(OSError, match="ended inside tensor 'a'"):
        weight_arena.load(tmp_path, index, ["a"])


def test_smollm2_logits_are_the_same_in_huge_pages(smollm_q4, monkeypatch):
    """The real model through both loaders: identical parameters and bit-identical prefill and decode logits."""
    plain = ModelRunner(smollm_q4.dir, smollm_q4.lib, verify_md5=False, huge_pages=False)
    huge = ModelRunner(smollm_q4.dir, smollm_q4.lib, verify_md5=False, huge_pages=True)
    assert plain.arena is None and huge.arena is not None
    assert len(plain.params) == len(huge.params)
    for a, b in zip(plain.params, huge.params):
        assert np.array_equal(a.numpy(), b.numpy())
    prompt = [1, 504, 3458, 282, 4649, 314, 260]
    logits = []
    for run in (plain, huge):
        cache = run.create_kv_cache(1, 64, 64)
        run.add_sequence(cache, 0)
        first = run.batch_prefill(cache, [0], [prompt])[0]
        second = run.batch_decode(cache, [0], [int(first.argmax())])[0]
        logits.append((first, second))
    assert np.array_equal(logits[0][0], logits[1][0]) and np.array_equal(logits[0][1], logits[1][1])
    monkeypatch.setenv(weight_arena.ENV, "0")  # the switch a deployment's device.huge_pages: false sets
    assert ModelRunner(smollm_q4.dir, smollm_q4.lib, verify_md5=False).arena is None
