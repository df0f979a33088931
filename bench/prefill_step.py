"""Prefill time of model libraries side by side, in one process, interleaved round by round (the machines here drift
by 1.5x within minutes; compare variants within a round, never one run after another).

    .venv/bin/python bench/prefill_step.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu LIB_A.so LIB_B.so \
        [--prompt-len 128 512] [--history 0] [--rounds 6]

For each round, prompt length and library: a fresh KV cache and one `batch_prefill` of the same random token ids
through ModelRunner (round 0 is a warm-up). Prints per prompt length the median tok/s of each library, the median
[min-max] over rounds of each library's tok/s divided by the first library's, and the largest |difference| between
the libraries' last-token logits. `--history N`: each sequence first gets N other tokens (untimed), so the timed
prefill attends to N cached rows too (as the later chunks of a long prompt do).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="artifact folder (weights, mlc-chat-config.json)")
    ap.add_argument("libs", nargs="+", help="model libraries compiled for it")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--history", type=int, default=0, help="tokens already in the KV cache (untimed prefill)")
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()

    from mlc_llm.serve.runner import ModelRunner

    runners = [ModelRunner(a.model, lib, "cpu") for lib in a.libs]
    rng = random.Random(0)
    speed = {(i, n): [] for i in range(len(runners)) for n in a.prompt_len}
    diff = {n: 0.0 for n in a.prompt_len}
    for rnd in range(a.rounds + 1):
        for n in a.prompt_len:
            history = [rng.randrange(256, runners[0].vocab_size) for _ in range(a.history)]
            prompt = [rng.randrange(256, runners[0].vocab_size) for _ in range(n)]
            logits = []
            for i, r in enumerate(runners):
                cache = r.create_kv_cache(1, a.history + n + 64, max(n, a.history, 128))
                r.add_sequence(cache, 0)
                if history:
                    r.batch_prefill(cache, [0], [history])
                start = time.perf_counter()
                logits.append(np.asarray(r.batch_prefill(cache, [0], [prompt])))
                if rnd:
                    speed[(i, n)].append(n / (time.perf_counter() - start))
            diff[n] = max(diff[n], *(float(np.abs(lg - logits[0]).max()) for lg in logits))
    for n in a.prompt_len:
        print(f"prompt {n} tokens" + (f" after {a.history} tokens of history" if a.history else "") +
              f", {a.rounds} rounds:")
        for i, lib in enumerate(a.libs):
            ratios = [x / y for x, y in zip(speed[(i, n)], speed[(0, n)])]
            print(f"  {lib}: {statistics.median(speed[(i, n)]):.0f} tok/s; / first library per round: "
                  f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]")
        print(f"  max |logit difference| between the libraries: {diff[n]:.2e}")


if __name__ == "__main__":
    main()
