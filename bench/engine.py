"""Engine benchmark on built artifacts: single-request decode speed and 8-way batched throughput.

    python bench/engine.py artifacts/SmolLM2-135M-Instruct-q4f32_1 --repeat 3 [--prompt-len 128]

Greedy, ignore_eos, fixed output length. Prints medians over repeats, the decode batch sizes the engine ran, and the
Python (host) time per decode step next to the model's own time per step. With `--prompt-len N` the prompts are N
random token ids (as `llama-batched-bench -npp N`), and the batched run also reports decode-only throughput: tokens
of the decode steps over their model + host time (llama-batched-bench's S_TG), prefill excluded.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlc_llm import MLCEngine  # noqa: E402

PROMPTS = ["The capital of France is", "One, two, three,", "def add(a, b):", "The sky is", "My favourite food is",
           "Water boils at", "The first president of the United States was", "Cats and dogs"]


def run_one(engine, prompt, tokens: int):
    start = time.perf_counter()
    r = engine.completions.create(prompt=prompt, max_tokens=tokens, temperature=0, ignore_eos=True)
    return r, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--model-lib")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-len", type=int, help="random token-id prompts of this length instead of PROMPTS")
    a = p.parse_args()
    prompts = PROMPTS
    if a.prompt_len:
        rng = random.Random(0)
        prompts = [[rng.randrange(256, 49152) for _ in range(a.prompt_len)] for _ in range(a.concurrency)]
    lib = a.model_lib or str(Path(a.model) / "lib" / "cpu.so")
    engine = MLCEngine(a.model, model_lib=lib, mode="server",
                       overrides=f"max_num_sequence={a.concurrency};max_total_seq_length="
                                 f"{max(4096, a.concurrency * ((a.prompt_len or 0) + a.tokens + 16))}")
    run_one(engine, prompts[0], 2)  # warm-up
    single = []
    for _ in range(a.repeat):
        r, _ = run_one(engine, prompts[0], a.tokens)
        ex = r.usage.extra
        single.append(ex["decode_tokens_per_s"])
    m0 = engine.metrics()
    batched = []
    for _ in range(a.repeat):
        results = [None] * a.concurrency

        def work(i):
            results[i] = run_one(engine, prompts[i % len(prompts)], a.tokens)[0]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(a.concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        batched.append(sum(r.usage.completion_tokens for r in results) / wall)
    m1 = engine.metrics()
    steps = m1["decode_steps"] - m0["decode_steps"]
    model_ms = 1000 * (m1["decode_time_s"] - m0["decode_time_s"]) / steps
    host_ms = 1000 * (m1["decode_host_time_s"] - m0["decode_host_time_s"]) / steps
    decode_only = (m1["decode_tokens"] - m0["decode_tokens"]) / (
        m1["decode_time_s"] - m0["decode_time_s"] + m1["decode_host_time_s"] - m0["decode_host_time_s"])
    engine.terminate()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}")
    print(f"model {a.model}, {a.tokens} output tokens, greedy, ignore_eos, {a.repeat} repeats (median [min-max])")
    print(f"  single request decode:      {statistics.median(single):7.2f} tok/s "
          f"[{min(single):.2f}-{max(single):.2f}]")
    print(f"  {a.concurrency} concurrent, output:     {statistics.median(batched):7.2f} tok/s "
          f"[{min(batched):.2f}-{max(batched):.2f}] (prompt prefill included)")
    print(f"  decode batch sizes run: {dict(sorted(m1['decode_batch_sizes'].items()))}")
    print(f"  per batched decode step: model {model_ms:.1f} ms, host (sampling/detok/commit) {host_ms:.2f} ms")
    print(f"  {a.concurrency} concurrent, decode steps only (S_TG): {decode_only:7.2f} tok/s"
          + (f" after {a.prompt_len}-token prompts" if a.prompt_len else ""))


if __name__ == "__main__":
    main()
