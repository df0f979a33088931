"""The Snakemake pipeline on the real SmolLM2 model: fresh build, no-op rebuild, exact rerun triggers, recovery."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlc_llm import pipeline, tensor_cache

from .conftest import REPO, run_cli, run_snakemake


def test_fresh_build_then_nothing_to_do(smollm_q4):
    for f in ("mlc-chat-config.json", "tensor-cache.json", "tokenizer.json", "lib/cpu.so"):
        assert (smollm_q4.dir / f).exists(), f
    assert "Nothing to be done" in smollm_q4.second.stdout + smollm_q4.second.stderr
    tensor_cache.verify(smollm_q4.dir)


def _dry_run_rules(workdir: Path, *overrides: str) -> set[str]:
    args = ["build_smollm2_cpu", "-n"]
    if overrides:
        args += ["--config", "deployment=smollm2_cpu", f"overrides=[{','.join(overrides)}]"]
    r = run_snakemake(workdir, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    return {line.split()[1].rstrip(":").split("_SmolLM2")[0] for line in out.splitlines()
            if line.startswith(("rule ", "localrule "))}


def test_config_changes_rerun_exactly_the_affected_steps(pipeline_dir, smollm_q4):
    assert _dry_run_rules(pipeline_dir) == set()
    # the chat template reaches gen_config only
    assert _dry_run_rules(pipeline_dir, "conv_template.system_message=Hi") == {"gen_config", "build_smollm2_cpu"}
    # the context window reaches gen_config and the library, not the weights
    assert _dry_run_rules(pipeline_dir, "model.context_window_size=4096") == {
        "gen_config", "compile_inputs", "compile", "build_smollm2_cpu"}
    # another quantization is another artifact folder: everything
    assert _dry_run_rules(pipeline_dir, "quantization=q0f16") == {
        "gen_config", "convert_weight", "compile_inputs", "compile", "build_smollm2_cpu"}


def test_code_changes_change_exactly_the_affected_step_hashes(tmp_path, monkeypatch):
    pkg = tmp_path / "mlc_llm"
    shutil.copytree(pipeline.PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline, "PACKAGE", pkg)
    before = {s: pipeline.code_hash(s) for s in pipeline.STEP_CODE}

    def changed_after_editing(rel: str) -> set[str]:
        with open(pkg / rel, "a") as f:
            f.write("\n# edited\n")
        now = {s: pipeline.code_hash(s) for s in pipeline.STEP_CODE}
        diff = {s for s in now if now[s] != before[s]}
        before.update(now)
        return diff

    assert changed_after_editing("compiler/passes.py") == {"compile"}
    assert changed_after_editing("tensor_cache.py") == {"convert_weight"}
    assert changed_after_editing("conversation.py") == {"gen_config"}
    assert changed_after_editing("model/llama.py") == {"gen_config", "convert_weight", "compile"}
    assert changed_after_editing("serve/runner.py") == set()


def test_greedy_answer_names_paris(smollm_q4):
    r = run_cli("generate", str(smollm_q4.dir), "--prompt", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout, r.stdout


def test_interrupted_build_leaves_nothing_complete_and_rerun_recovers(tmp_path):
    """Ctrl-C while convert_weight writes shards: no tensor-cache.json (the completeness mark); `mlc_llm build`
    then finishes the job."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mlc_llm", "build", "smollm2_cpu", "quantization=q0f16", "--workdir", str(tmp_path)]
    model_dir = tmp_path / "artifacts" / "SmolLM2-135M-Instruct-q0f16"
    # Ctrl-C as in a terminal: SIGINT at its default in the build (a child inherits an *ignored* SIGINT, and after
    # some earlier tests the pytest process has SIGINT ignored — seen as SigIgn in /proc for the build processes)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and not list(model_dir.glob(".convert-*/params_shard_0.bin")):
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    assert not (model_dir / "tensor-cache.json").exists()
    with pytest.raises(tensor_cache.TensorCacheError, match="never converted or the conversion did not finish"):
        tensor_cache.verify(model_dir)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    tensor_cache.verify(model_dir)
    assert not list(model_dir.glob(".convert-*"))
    assert (model_dir / "lib" / "cpu.so").exists()
