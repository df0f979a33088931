"""Launching: `snakemake serve_<name>` / `chat_<name>`, /health while loading or broken, the chat CLI in a pty."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from .conftest import REPO, run_cli, run_snakemake
from .server_utils import ServerProcess, free_port

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2"]


def test_serve_target_builds_then_becomes_the_server(smollm_q4, pipeline_dir, tmp_path):
    port = free_port()
    cmd = [*SNAKEMAKE, "-d", str(pipeline_dir), "serve_smollm2_cpu", "--config", "deployment=smollm2_cpu",
           f"overrides=[server.port={port}]"]
    srv = ServerProcess([], port, tmp_path / "serve.log", cmd=cmd)
    try:
        srv.wait_health(200)
        cmdline = open(f"/proc/{srv.proc.pid}/cmdline", "rb").read().split(b"\0")
        assert b"serve" in cmdline and b"mlc_llm" in cmdline  # Snakemake's own process became the server
        model = "artifacts/SmolLM2-135M-Instruct-q4f32_cpu"
        r = requests.post(f"{srv.url}/v1/completions", json={"model": model, "prompt": "The sky is",
                                                             "max_tokens": 2, "temperature": 0}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in srv.log()
    assert not list((pipeline_dir / ".snakemake" / "locks").glob("*"))  # a later run is not locked out
    with pytest.raises(requests.ConnectionError):
        requests.get(srv.url + "/health", timeout=5)


def test_chat_target_rebuilds_a_missing_shard_and_reads_piped_stdin(smollm_q4, pipeline_dir, tmp_path):
    # on a copy of the session's build (workdir state included): other tests keep an intact one whatever happens here
    pipeline_dir = tmp_path / "work"
    shutil.copytree(smollm_q4.dir.parent.parent / ".snakemake", pipeline_dir / ".snakemake")
    model_dir = pipeline_dir / "artifacts" / smollm_q4.dir.name
    shutil.copytree(smollm_q4.dir, model_dir)
    shard = model_dir / "params_shard_0.bin"
    shard.unlink()
    script = "/set temperature=0;max_gen_len=12\nWhat is the capital of France?\n/stats\n/exit\n"
    r = subprocess.run([*SNAKEMAKE, "-d", str(pipeline_dir), "chat_smollm2_cpu"], input=script, text=True,
                       capture_output=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "convert_weight" in r.stderr and shard.exists()
    assert "Paris" in r.stdout and "prefill:" in r.stdout and "decode:" in r.stdout
    again = run_snakemake(pipeline_dir, "-n", "build_smollm2_cpu")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_two_launch_targets_are_refused(smollm_q4, pipeline_dir):
    r = run_snakemake(pipeline_dir, "serve_smollm2_cpu", "chat_smollm2_cpu")
    assert r.returncode != 0 and "one launch target at a time" in r.stderr


def test_health_503_when_the_model_cannot_load(smollm_q4, tmp_path):
    bad_lib = tmp_path / "broken.so"
    bad_lib.write_bytes(b"not a shared library")
    port = free_port()
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(bad_lib), "--device", "cpu"], port,
                        tmp_path / "bad.log")
    try:
        deadline = time.time() + 60
        while True:
            try:
                h = requests.get(srv.url + "/health", timeout=5)
                if h.json().get("status") == "error":
                    break
            except requests.ConnectionError:
                pass
            assert time.time() < deadline, srv.log()
            time.sleep(0.1)
        assert h.status_code == 503 and "broken.so" in h.json()["error"]
        r = requests.post(srv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                          timeout=10)
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_health_503_while_loading_then_200(smollm_q4):
    """The app answers /health before the engine is loaded (here held back until the test says go)."""
    from fastapi.testclient import TestClient

    from mlc_llm import AsyncMLCEngine
    from mlc_llm.serve.server import create_app

    go = threading.Event()

    def load():
        go.wait(60)
        return AsyncMLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), device="cpu")

    with TestClient(create_app(load, "smollm")) as client:
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = client.post("/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        go.set()
        deadline = time.time() + 60
        while client.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        r = client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_serve_flags_not_supported_say_so(smollm_q4):
    for extra, words in ((["--enable-tracing"], "--enable-tracing is not supported"),
                         (["--speculative-mode", "eagle"], "unknown speculative_mode 'eagle'"),
                         (["--additional-models", "x"], "draft models for speculative_mode 'small_draft', not"),
                         (["--speculative-mode", "small_draft"], "'small_draft' needs one draft model"),
                         (["--spec-draft-length", "99", "--speculative-mode", "ngram"], "spec_draft_length must"),
                         (["--overrides", "max_num_sequence=abc"], "max_num_sequence"),
                         (["--replicas", "2"], "--replicas and --ray-address need --backend ray"),
                         (["--backend", "ray", "--replicas", str(4 * (os.cpu_count() or 1))], "CPUs; this machine")):
        r = run_cli("serve", str(smollm_q4.dir), *extra, timeout=60)
        assert r.returncode == 1 and words in r.stderr, r.stderr
    r = run_cli("serve", "/no/such/model", timeout=60)
    assert r.returncode == 1 and "mlc-chat-config.json" in r.stderr
    r = run_cli("serve", str(smollm_q4.dir), "--allowed-origins", "*", timeout=60)
    assert r.returncode == 2 and "JSON" in r.stderr


def test_chat_cli_in_a_pseudo_terminal(smollm_q4):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "mlc_llm", "chat", str(smollm_q4.dir), "--model-lib",
                                           str(smollm_q4.lib), "--device", "cpu"],
                          env={**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb"}, encoding="utf-8",
                          timeout=120, dimensions=(40, 200))
    try:
        child.expect(">>> ")
        child.sendline("/set temperature=0;max_gen_len=12")
        child.expect("settings: .*'temperature': 0.0, 'max_tokens': 12")
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"prefill: [0-9.]+ tok/s, decode: [0-9.]+ tok/s \((\d+) prompt tokens, (\d+) generated\)")
        first_prompt, first_answer = int(child.match.group(1)), int(child.match.group(2))
        child.expect(">>> ")
        child.sendline("/set bogus=1")
        child.expect("unknown setting 'bogus'")
        child.expect(">>> ")
        child.sendline("/set max_gen_len=2")
        child.expect(">>> ")
        child.sendline("And of Italy?")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"\((\d+) prompt tokens")
        assert int(child.match.group(1)) > first_prompt + first_answer  # the history is part of the prompt
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("RESET CHAT SUCCESS")
        child.expect(">>> ")
        child.sendline("Hi")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"\((\d+) prompt tokens")
        assert int(child.match.group(1)) < first_prompt  # history gone
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


# ---- units: no model needed --------------------------------------------------------------------------------------
def test_chat_set_parsing():
    from mlc_llm.chat import parse_set

    assert parse_set("temperature=0.5;max_gen_len=100;stop=end,stop") == {
        "temperature": 0.5, "max_tokens": 100, "stop": ["end", "stop"]}
    assert parse_set("seed=") == {"seed": None}
    for bad, word in (("temperature=hot", "not a number"), ("max_gen_len=1.5", "not an integer"),
                      ("foo=1", "unknown setting"), ("temperature", "key=value")):
        with pytest.raises(ValueError, match=word):
            parse_set(bad)


def test_launch_commands_from_the_plan():
    from mlc_llm.config import ConfigError
    from mlc_llm.pipeline import make_plan

    plan = make_plan({"deployment": "smollm2_cpu", "overrides": ["server.port=8123", "mode=server",
                                                                 "mode.max_num_sequence=4", "device.num_threads=2"]})
    serve = plan.launch_cmd("smollm2_cpu", "serve")
    assert serve.startswith("env TVM_NUM_THREADS=2 python -m mlc_llm serve artifacts/SmolLM2-135M-Instruct-q4f32_cpu ")
    for part in ("--model-lib artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu.so", "--device cpu", "--mode server",
                 "--port 8123", "--host 127.0.0.1", "max_num_sequence=4"):
        assert part in serve
    assert " chat " in plan.launch_cmd("smollm2_cpu", "chat")
    assert "--no-ui" not in serve and "gpu_memory_utilization" not in serve  # a CPU sizes from RAM
    default = make_plan({})
    assert default.deployments["smollm2_cpu"].mode.name.value == "interactive"  # the terminal chat: one sequence
    assert " --mode local " in default.launch_cmd("smollm2_cpu", "serve")  # a server batches
    assert " --mode server " in make_plan({"deployment": "smollm2_cpu", "overrides": ["server.mode=server"]}) \
        .launch_cmd("smollm2_cpu", "serve")
    assert "gpu_memory_utilization=0.85" in default.launch_cmd("smollm2_cuda", "serve")
    assert "MLC_HUGE_PAGES" not in serve  # weights in huge pages unless the deployment says no
    no_huge = make_plan({"deployment": "smollm2_cpu", "overrides": ["device.huge_pages=false", "device.num_threads=2"]})
    assert no_huge.launch_cmd("smollm2_cpu", "chat").startswith(
        "env TVM_NUM_THREADS=2 MLC_HUGE_PAGES=0 python -m mlc_llm chat ")
    no_ui = make_plan({"deployment": "smollm2_cpu", "overrides": ["server.ui=false"]})
    assert no_ui.launch_cmd("smollm2_cpu", "serve").endswith(" --no-ui")
    assert plan.launch_target({"serve_smollm2_cpu"}) == ("smollm2_cpu", "serve")
    assert plan.launch_target({"build_smollm2_cpu"}) is None
    with pytest.raises(ConfigError, match="need deployment="):
        make_plan({"overrides": ["server.port=1"]})
    with pytest.raises(ConfigError, match="server.port"):
        make_plan({"deployment": "smollm2_cpu", "overrides": ["server.port=70000"]})
    ray = make_plan({"deployment": "smollm2_cpu", "overrides": ["server.backend=ray", "server.replicas=2",
                                                               "server.ray_address=auto"]})
    assert ray.launch_cmd("smollm2_cpu", "serve").endswith(" --backend ray --replicas 2 --ray-address auto")
    assert "--backend" not in default.launch_cmd("smollm2_cpu", "serve")
    for bad, words in (("server.backend=k8s", "server.backend: 'k8s'"), ("server.replicas=2", "need server.backend"),
                       ("server.replicas=0", "server.replicas: must be a positive integer")):
        with pytest.raises(ConfigError, match=words):
            make_plan({"deployment": "smollm2_cpu", "overrides": [bad]})


def test_bench_latency_with_profile(smollm_q4, tmp_path):
    out = tmp_path / "latency.json"
    r = run_cli("bench", "latency", str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu",
                "--prompt-len", "4", "--gen-len", "3", "--repeat", "2", "--profile", "--profile-context", "8",
                "--profile-prefill", "40", "--result-json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    [run] = res["runs"]
    assert run["prefill_tok_s"]["median"] > 0 and run["decode_tok_s"]["median"] > 0 and res["weight_bytes"] > 5e7
    prof = res["profile"]
    names = [c["name"] for c in prof["calls"]]
    assert any("NT_matmul" in n for n in names) and any("attention" in n for n in names)
    assert sum(c["ms"] for c in prof["calls"]) <= prof["wall_ms"] * 1.05
    assert "one decode step" in r.stdout and "pp4:" in r.stdout
    pre = res["prefill_profile"]
    calls = {c["name"]: c["calls"] for c in pre["calls"]}
    assert pre["tokens"] == 40 and any("NT_matmul" in n and k == 30 for n, k in calls.items())  # once per layer
    assert any("attention" in n for n in calls) and sum(c["ms"] for c in pre["calls"]) <= pre["wall_ms"] * 1.05
    assert "one prefill of 40 tokens" in r.stdout


def test_bench_latency_refuses_a_prefill_profile_longer_than_a_chunk(smollm_q4):
    r = run_cli("bench", "latency", str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu",
                "--prompt-len", "4", "--gen-len", "2", "--repeat", "1", "--profile-prefill", "5000", timeout=300)
    assert r.returncode != 0
    assert "--profile-prefill 5000: the model library prefills at most 2048 tokens at once" in r.stderr
