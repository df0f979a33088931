"""Start `mlc_llm serve` as a real process and talk to it over HTTP."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from .conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], port: int, log: Path, cmd: list[str] | None = None, cwd: Path | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        key = args[args.index("--api-key") + 1] if "--api-key" in args else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.log_path = log
        self._log = open(log, "w")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cmd = cmd or [sys.executable, "-m", "mlc_llm", "serve", *args, "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_health(self, status: int = 200, timeout: float = 300) -> list[int]:
        """Poll GET /health until it answers `status`; returns every status seen (connection refused is 0)."""
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                code = requests.get(self.url + "/health", timeout=5).status_code
            except requests.ConnectionError:
                code = 0
            if not seen or seen[-1] != code:
                seen.append(code)
            if code == status:
                return seen
            time.sleep(0.05)
        raise AssertionError(f"no {status} from /health in {timeout} s (seen {seen}):\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def scrape(url: str, headers: dict | None = None) -> dict[str, float]:
    """GET /metrics -> {'name{labels}': value}, plus label-less sums per metric name."""
    text = requests.get(url + "/metrics", headers=headers, timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name + labels] = value
        out[name] = out.get(name, 0.0) + value
    return out


def wait_idle(server: ServerProcess, timeout: float = 60) -> dict[str, float]:
    """Metrics once nothing runs or waits (asserting within `timeout` seconds: a bound against hanging), after the
    prefix cache is dropped: KV usage is then 0 unless a request's KV leaked."""
    deadline = time.time() + timeout
    while True:
        m = scrape(server.url)
        if m["mlc_llm:num_requests_running"] == 0 and m["mlc_llm:num_requests_waiting"] == 0:
            r = requests.post(f"{server.url}/reset_prefix_cache", headers=server.headers, timeout=60)
            assert r.status_code == 200, r.text
            return scrape(server.url)
        assert time.time() < deadline, m
        time.sleep(0.1)
