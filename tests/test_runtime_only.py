"""The runtime side runs on a runtime-only TVM (no compiler library): what a deployment host or GPU box ships."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from mlc_llm.serve.runner import ModelRunner

from .conftest import REPO

SCRIPT = """
import json, sys
from mlc_llm.serve.runner import ModelRunner
import tvm
runner = ModelRunner(sys.argv[1], sys.argv[2])
tokens = runner.greedy_generate([1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2], 4)
print(json.dumps({"runtime_only": bool(tvm.base._RUNTIME_ONLY), "tokens": tokens,
                  "relax": any(m.startswith("tvm.relax") for m in sys.modules)}))
"""


def test_runner_works_without_the_tvm_compiler(smollm_q4):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TVM_USE_RUNTIME_LIB": "1"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(smollm_q4.dir), str(smollm_q4.lib)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["runtime_only"] is True and out["relax"] is False
    full = ModelRunner(smollm_q4.dir, smollm_q4.lib, verify_md5=False)
    assert out["tokens"] == full.greedy_generate([1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2], 4)
