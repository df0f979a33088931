"""The GPU machine's scripts, run here in their CPU dry-run form: the one-call check script goes through every
stage on tiny models, and random weights written from a library's metadata load and run."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from .conftest import REPO


def test_random_weights_follow_the_library_and_run(tmp_path):
    sys.path.insert(0, str(REPO / "scripts" / "gpu"))
    import random_weights

    from mlc_llm.serve.runner import ModelRunner

    d = tmp_path / "m"
    for step in (["gen_config", "random:tiny", "--quantization", "q4f16_1", "--conv-template", "chatml", "-o", d],
                 ["compile", d, "--device", "cpu", "-o", d / "lib" / "cpu.so"]):
        subprocess.run([sys.executable, "-m", "mlc_llm", *map(str, step)], check=True, capture_output=True, cwd=REPO)
    params = random_weights.library_params(str(d / "lib" / "cpu.so"), "cpu")
    info = random_weights.write(d, params, seed=3)
    assert info["params"] == len(params) > 10
    runner = ModelRunner(d, d / "lib" / "cpu.so")  # md5s, names, shapes and dtypes checked against the library
    cache = runner.create_kv_cache(1, 64)
    runner.add_sequence(cache, 0)
    logits = runner.batch_prefill(cache, [0], [[5, 6, 7, 8]])
    assert np.isfinite(logits).all() and logits.std() > 0
    stored = {r["name"]: r for s in json.loads((d / "tensor-cache.json").read_text())["records"] for r in s["records"]}
    norm = next(p["name"] for p in params if "norm" in p["name"])
    arrays = __import__("mlc_llm.tensor_cache", fromlist=["load_numpy"]).load_numpy(d)
    assert np.all(arrays[norm] == 1) and set(stored) == {p["name"] for p in params}


def test_device_run_dry_run_goes_through_every_stage(tmp_path):
    r = subprocess.run([sys.executable, "scripts/gpu/device_run.py", "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["stages"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list(stages) == ["env", "bandwidth", "logits", "bench", "hf", "serve"]
    assert all(s["status"] == "ok" for s in stages.values())
    assert stages["logits"]["pass"] is True and stages["logits"]["max_abs_dlogit"] < 2e-2
    assert stages["bandwidth"]["GBps_read_plus_write"] > 0
    for q in ("q4f16_1", "q0f32"):
        b = stages["bench"][q]
        assert b["decode_tok_s_after_pp16"] > 0 and b["prefill_tok_s_pp64"] > 0 and 0 < b["share_of_ceiling"]
    levels = stages["serve"]["levels"]
    assert [lv["max_concurrency"] for lv in levels] == [1, 2]
    assert all(lv["completed"] > 0 and lv["failed"] == 0 for lv in levels)
    assert "skipped" in stages["hf"] or stages["hf"]["decode_tok_s_after_pp16"] > 0
