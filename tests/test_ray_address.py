"""`mlc_llm serve --backend ray --ray-address ADDR`: joining a Ray cluster started beforehand (`ray start --head`), and
leaving it running (only our application removed) when the server stops."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from .server_utils import ServerProcess, free_port

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")

RAY = str(Path(sys.executable).with_name("ray"))


def _cluster_apps(address: str, auth: dict[str, str]) -> tuple[list[str], float]:
    """(Serve applications, free CPUs) of the cluster, asked by a separate driver."""
    code = ("import ray, json; from ray import serve; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps([list(serve.status().applications), ray.available_resources().get('CPU', 0)]))"
            % address)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **auth})
    assert r.returncode == 0, r.stderr[-2000:]
    apps, cpus = json.loads(r.stdout.strip().splitlines()[-1])
    return apps, cpus


def test_join_an_existing_cluster_and_leave_it_running(smollm_q4, tmp_path):
    if not Path(RAY).exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    from ray._private.services import get_node_ip_address

    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    # token authentication on, with a token of this test's own (whatever ~/.ray holds)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    start = subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "2",
                            "--include-dashboard=false", "--disable-usage-stats"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, **auth})
    assert start.returncode == 0, start.stderr[-2000:]
    server = None
    try:
        http = free_port()
        # without the token (an explicit address never picks it up): one clear line
        r = subprocess.run([sys.executable, "-m", "mlc_llm", "serve", str(smollm_q4.dir), "--backend", "ray",
                            "--ray-address", address, "--port", str(http)], capture_output=True, text=True,
                           timeout=180, env={k: v for k, v in os.environ.items() if k not in auth})
        assert r.returncode == 1 and "cannot join the Ray cluster" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr, \
            r.stderr[-2000:]
        # with the setting and the token
        cmd = ["env", "TVM_NUM_THREADS=1", *(f"{k}={v}" for k, v in auth.items()), sys.executable, "-m", "mlc_llm",
               "serve", str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--backend", "ray", "--replicas", "2",
               "--ray-address", address, "--port", str(http)]
        server = ServerProcess([], http, tmp_path / "server.log", cmd=cmd)
        server.wait_health(timeout=300)
        r = requests.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
            "temperature": 0}, timeout=120)
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"], r.text
        deadline = time.time() + 120  # each replica appears once its first report reaches the hub
        while len(replicas := requests.get(server.url + "/health", timeout=10).json()["replicas"]) != 2:
            assert time.time() < deadline, replicas
            time.sleep(0.5)
        assert _cluster_apps(address, auth)[0] == ["mlc_llm"]
        assert server.stop(signal.SIGINT, timeout=90) == 0, server.log()[-3000:]
        # the cluster outlives the server: our application is gone and its CPUs are free again
        deadline = time.time() + 60
        while (state := _cluster_apps(address, auth)) != ([], 2.0):
            assert time.time() < deadline, state
            time.sleep(1)
    finally:
        if server is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
