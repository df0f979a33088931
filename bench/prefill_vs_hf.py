"""Our prefill against HF transformers' (PyTorch) on the same GGUF, single prefills interleaved pair by pair.

    .venv/bin/python bench/prefill_vs_hf.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --hf-python /tmp/hfvenv/bin/python \
        [--model-lib LIB ...] [--prompt-len 128 512] [--pairs 40] [--threads 2] [--hf-dtype bfloat16]

The machines here switch between speed modes (~2x) within seconds to minutes, so sides measured minutes apart
(bench/compare_llamacpp.py's rounds: each side runs all its repetitions, then the other) give per-round ratios
from 0.7 to 1.2 for the same two programs. Here HF runs in a child process (bench/hf_prefill.py --serve, a Python
with torch + transformers + gguf) and our libraries in this one (ModelRunner: one `batch_prefill` of the same random
token ids into a fresh KV cache, as prefill_step.py; HF: one forward with a fresh cache, last position's logits);
each pair is one HF prefill and one prefill of each library, alternating which side goes first, with a pause
between (so neither side's idle pool threads spin during the other's prefill). Per prompt length: each side's median
tok/s and the median [min-max] of the per-pair ratios ours / HF. The first `--warmup` pairs are not counted.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="our artifact folder (built from the same GGUF)")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--hf-python", required=True, help="a Python with torch + transformers + gguf")
    ap.add_argument("--hf-dtype", default="bfloat16")
    ap.add_argument("--model-lib", nargs="+", help="our libraries (default: MODEL/lib/cpu.so)")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--pause", type=float, default=0.1, help="seconds between two prefills")
    a = ap.parse_args()

    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from mlc_llm.serve.runner import ModelRunner

    libs = a.model_lib or [str(Path(a.model) / "lib" / "cpu.so")]
    runners = [ModelRunner(a.model, lib, "cpu") for lib in libs]
    hf = subprocess.Popen([a.hf_python, str(Path(__file__).with_name("hf_prefill.py")), "--gguf", a.gguf,
                           "--threads", str(a.threads), "--dtype", a.hf_dtype, "--serve"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if hf.stdout.readline().strip() != "ready":
            sys.exit("HF transformers did not load the model (see its error above)")

        def run_hf(n: int) -> float:
            hf.stdin.write(f"{n}\n")
            hf.stdin.flush()
            return float(hf.stdout.readline())

        rng = random.Random(0)
        prompts = {n: [rng.randrange(256, runners[0].vocab_size) for _ in range(n)] for n in a.prompt_len}

        def run_ours(r, n: int) -> float:
            cache = r.create_kv_cache(1, n + 64, max(n, 128))
            r.add_sequence(cache, 0)
            start = time.perf_counter()
            r.batch_prefill(cache, [0], [prompts[n]])
            return time.perf_counter() - start

        times = {(side, n): [] for side in ["hf", *range(len(runners))] for n in a.prompt_len}
        for pair in range(a.warmup + a.pairs):
            for n in a.prompt_len:
                sides = ["hf", *range(len(runners))]
                if pair % 2:
                    sides.reverse()
                got = {}
                for side in sides:
                    got[side] = run_hf(n) if side == "hf" else run_ours(runners[side], n)
                    time.sleep(a.pause)
                if pair >= a.warmup:
                    for side, t in got.items():
                        times[(side, n)].append(t)
    finally:
        hf.stdin.close()
        hf.wait(timeout=60)

    print(f"{a.model}: {a.pairs} pairs, TVM_NUM_THREADS / torch threads = {a.threads}, HF {a.hf_dtype}")
    for n in a.prompt_len:
        hf_tps = [n / t for t in times[("hf", n)]]
        print(f"prompt {n} tokens: HF {a.hf_dtype} {statistics.median(hf_tps):.1f} tok/s "
              f"[{min(hf_tps):.1f}-{max(hf_tps):.1f}]")
        for i, lib in enumerate(libs):
            ours = [n / t for t in times[(i, n)]]
            ratios = [th / to for th, to in zip(times[("hf", n)], times[(i, n)])]
            print(f"  {lib}: {statistics.median(ours):.1f} tok/s [{min(ours):.1f}-{max(ours):.1f}]; "
                  f"ours / HF per pair {statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}], "
                  f"> 1 in {sum(r > 1 for r in ratios)} of {len(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
