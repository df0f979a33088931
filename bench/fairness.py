"""Time to first token of a short request, and the longest pause of a running stream, while a long prompt is being
prefilled (MLCEngine on a built model, one process).

    python bench/fairness.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu --long-tokens 7000 --rounds 3

Each round: a stream starts (greedy, 200 tokens); once it is flowing, a prompt of --long-tokens random token ids is
submitted; --short-delay seconds later a short request is (late in the long prefill, where its chunks cost the most).
Reported per setting of `long_prefill_token_threshold` (the cap on one prompt's prefill chunk while other requests
run or wait; the engine's default, and prefill_chunk_size for comparison): the long prompt's time to first token, the
short request's, and the stream's longest gap between tokens during the long prefill. Medians over the rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np


def one_round(engine, long_tokens: int, seed: int, short_delay: float) -> dict[str, float]:
    prompt = [int(t) for t in np.random.default_rng(seed).integers(1000, 20000, size=long_tokens)]
    stamps: list[float] = []
    out: dict[str, float] = {}

    def stream():
        for chunk in engine.completions.create(prompt="Once upon a time", max_tokens=200, temperature=0,
                                               ignore_eos=True, stream=True):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())

    def first_token(name: str, **kw):
        start = time.perf_counter()
        for chunk in engine.completions.create(stream=True, temperature=0, **kw):
            if chunk.choices and chunk.choices[0].text:
                out[name] = time.perf_counter() - start
                out[name + "_at"] = time.perf_counter()
                break

    s = threading.Thread(target=stream)
    s.start()
    while len(stamps) < 3:
        time.sleep(0.001)
    long = threading.Thread(target=first_token, args=("long_ttft_s",), kwargs=dict(prompt=prompt, max_tokens=2))
    long_start = time.perf_counter()
    long.start()
    time.sleep(short_delay)
    first_token("short_ttft_s", prompt="The capital of France is", max_tokens=4)
    long.join()
    s.join()
    during = [t for t in stamps if long_start <= t <= out["long_ttft_s_at"]]
    gaps = np.diff([long_start, *during, out["long_ttft_s_at"]])
    out["stream_max_gap_s"] = float(gaps.max())
    out["stream_tokens_during_long"] = len(during)
    return {k: v for k, v in out.items() if not k.endswith("_at")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--model-lib", default=None)
    ap.add_argument("--long-tokens", type=int, default=7000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--short-delay", type=float, default=0.5, help="seconds after the long prompt")
    ap.add_argument("--thresholds", type=int, nargs="*", default=[0, 2048],
                    help="long_prefill_token_threshold values (0: the engine's default)")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    from mlc_llm import MLCEngine

    lib = a.model_lib or f"{a.model}/lib/cpu.so"
    results = {}
    for threshold in a.thresholds:
        overrides = "max_num_sequence=4;max_total_seq_length=8192"
        if threshold:
            overrides += f";long_prefill_token_threshold={threshold}"
        with MLCEngine(a.model, model_lib=lib, device="cpu", mode="local", overrides=overrides) as engine:
            name = f"threshold={engine.config.long_prefill_token_threshold}"
            engine.completions.create(prompt="warm up", max_tokens=2)
            rounds = [one_round(engine, a.long_tokens, seed, a.short_delay) for seed in range(a.rounds)]
        results[name] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        results[name]["rounds"] = rounds
        print(name, {k: round(v, 3) for k, v in results[name].items() if k != "rounds"}, flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
