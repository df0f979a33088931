"""Serving throughput with engine replicas: the single-process server against `--backend ray` with 1 and with N
replicas, on the same cores, interleaved rounds, `mlc_llm bench serve` (closed loop) as the client.

    python bench/replicas.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu --rounds 3 --concurrency 8

Each configuration gets the machine's cores: local = one engine with all threads; ray xN = N replicas with
cores / N threads each. A server is started, warmed up, measured and stopped before the next one starts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests

from mlc_llm.bench_serve import bench_serve


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, lib: str, backend: str, replicas: int, threads: int, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlc_llm", "serve", model, "--model-lib", lib, "--port", str(port), "--mode",
           "server", "--log-level", "warning"]
    if backend == "ray":
        cmd += ["--backend", "ray", "--replicas", str(replicas)]
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            body = requests.get(url + "/health", timeout=5).json()
            if body.get("status") == "ok" and len(body.get("replicas", [None] * replicas)) == replicas:
                return proc, url
        except (requests.ConnectionError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--model-lib", help="default: MODEL/lib/cpu.so")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--replicas", type=int, default=2, help="N of the ray xN configuration")
    ap.add_argument("--log-dir", default="/tmp")
    a = ap.parse_args()
    lib = a.model_lib or str(Path(a.model) / "lib" / "cpu.so")
    cores = os.cpu_count() or 1
    configs = [("local", "local", 1, cores), ("ray x1", "ray", 1, cores),
               (f"ray x{a.replicas}", "ray", a.replicas, max(1, cores // a.replicas))]
    results: dict[str, list[dict]] = {name: [] for name, *_ in configs}
    for rnd in range(a.rounds):
        for name, backend, replicas, threads in configs:
            proc, url = start(a.model, lib, backend, replicas, threads,
                              Path(a.log_dir) / f"replicas-{name.replace(' ', '')}.log")
            try:
                (r,) = bench_serve(url, None, [a.concurrency], a.num_prompts, a.input_len, a.output_len, False,
                                   49152, 0, None, None)
            finally:
                stop(proc)
            assert r["completed"] == a.num_prompts, r
            results[name].append(r)
            print(f"round {rnd + 1} {name:8s} ({replicas} x {threads} threads): {r['request_throughput']:.2f} req/s, "
                  f"{r['output_throughput']:.1f} output tok/s, median TTFT {r['median_ttft_ms']:.0f} ms, "
                  f"median TPOT {r['median_tpot_ms']:.1f} ms", flush=True)
    print(f"\nconcurrency {a.concurrency}, {a.num_prompts} requests of {a.input_len} -> {a.output_len} tokens, "
          f"{a.rounds} rounds (median [min-max]); {cores} cores")
    base = statistics.median(r["output_throughput"] for r in results["local"])
    for name, *_ in configs:
        tps = [r["output_throughput"] for r in results[name]]
        ttft = [r["median_ttft_ms"] for r in results[name]]
        print(f"  {name:8s} output tok/s {statistics.median(tps):7.1f} [{min(tps):.1f}-{max(tps):.1f}]  "
              f"x{statistics.median(tps) / base:.2f} of local   median TTFT {statistics.median(ttft):6.0f} ms")


if __name__ == "__main__":
    main()
