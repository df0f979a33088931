"""The runtime side runs on a runtime-only TVM (no compiler library): what a deployment host or GPU box ships."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

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


# The engine and the CLI with the build side's packages missing too (the environment scripts/gpu/ installs: no
# omegaconf, hydra, gguf or snakemake), imports of those blocked in the subprocess.
BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("omegaconf", "hydra", "gguf", "snakemake")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {name}")
    sys.meta_path.insert(0, Block())
    import tvm.base
    assert tvm.base._RUNTIME_ONLY
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TVM_USE_RUNTIME_LIB": "1"}
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_engine_chats_on_a_runtime_only_tvm(smollm_q4):
    r = _run(f"""
        from mlc_llm import MLCEngine
        try:
            MLCEngine({str(smollm_q4.dir)!r}, device="cpu")
            raise SystemExit("no error without a model library")
        except FileNotFoundError as e:
            assert "runtime-only" in str(e) and "model_lib" in str(e), e
        engine = MLCEngine({str(smollm_q4.dir)!r}, model_lib={str(smollm_q4.lib)!r}, device="auto")
        r = engine.chat.completions.create(messages=[{{"role": "user", "content": "What is the capital of France?"}}],
                                           max_tokens=16, temperature=0)
        print(r.choices[0].message.content)
        engine.terminate()
        assert "tvm.relax" not in sys.modules and "omegaconf" not in sys.modules
    """)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Paris" in r.stdout


def test_cli_bench_runs_on_a_runtime_only_tvm(smollm_q4):
    r = _run(f"""
        from mlc_llm.cli import main
        rc = main(["bench", "latency", {str(smollm_q4.dir)!r}, "--model-lib", {str(smollm_q4.lib)!r},
                   "--prompt-len", "8", "--gen-len", "4", "--repeat", "1"])
        assert rc == 0, rc
        rc = main(["bench", "latency", "/nonexistent/model"])
        assert rc == 1, rc
    """)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "pp8" in r.stdout and "error:" in r.stderr
