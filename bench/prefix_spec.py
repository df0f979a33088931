"""Prefix cache and n-gram speculation, each against the same engine with the feature off (one process, interleaved
rounds, medians and spread).

    python bench/prefix_spec.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu --rounds 5

Prefix cache — time to first token (streamed, greedy) of:
  * turn 5 of a chat (turns 1-4 answered by the same engine just before);
  * a request whose 1,000-token system prompt an earlier request used.
Speculation — decode tokens/s of one request (greedy, 128 tokens) and of 4 concurrent ones, on a repetitive task (the
answer copies the prompt: "repeat this text") and on free writing, with the acceptance rate and tokens per verify step:
n-gram with a fixed draft length (--draft-length, every step) and with spec_draft_length 0 (auto: drafts only while
measured step times and acceptance say it pays). With --draft-model DIR, the same for small_draft.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import time

from mlc_llm import MLCEngine
from mlc_llm.serve.config import EngineConfig

PARAGRAPH = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
             "members agreed to fund the children's reading room, the repair of the roof, and a small garden "
             "behind the building. The work will start in March and should be finished before the summer holidays, "
             "when the library expects the largest number of visitors.")
SYSTEM = "You answer questions about a fictional town. " + " ".join(
    f"Fact {i}: the house at number {i} is painted {c}." for i, c in
    zip(range(1, 66), ["red", "blue", "green", "white", "yellow"] * 13))
QUESTIONS = ["Name a colour.", "Name an animal of that colour.", "Where does it live?", "What does it eat?",
             "Give it a name."]
TOPICS = ["a lighthouse", "a market", "a train", "a garden", "a storm", "a kite", "an owl", "a bridge"]


def ttft(engine, messages) -> float:
    start = time.perf_counter()
    for chunk in engine.chat.completions.create(messages=messages, temperature=0, max_tokens=8, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            return time.perf_counter() - start
    return time.perf_counter() - start


def chat_turn5(engine, topic: str) -> float:
    messages = [{"role": "system", "content": f"You are a terse assistant. The topic is {topic}."}]
    for q in QUESTIONS[:4]:
        messages.append({"role": "user", "content": q})
        r = engine.chat.completions.create(messages=messages, temperature=0, max_tokens=48)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    messages.append({"role": "user", "content": QUESTIONS[4]})
    return ttft(engine, messages)


def shared_prefix(engine, i: int) -> float:
    engine.chat.completions.create(messages=[{"role": "system", "content": SYSTEM}, {
        "role": "user", "content": f"What colour is house {i}?"}], temperature=0, max_tokens=4)
    return ttft(engine, [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"What colour is house {i + 1}?"}])


def decode_speed(engine, prompts: list[str], concurrency: int) -> tuple[float, list[str]]:
    """Generated tokens / wall time after each request's first token, summed over concurrent requests."""
    def one(p):
        r = engine.completions.create(prompt=p, temperature=0, max_tokens=128, ignore_eos=True)
        return r.usage.completion_tokens, r.usage.extra["ttft_s"], r.usage.extra["end_to_end_latency_s"], \
            r.choices[0].text

    with cf.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        out = list(pool.map(one, prompts[:concurrency]))
        wall = time.perf_counter() - start
    tokens = sum(n - 1 for n, _, _, _ in out)
    return tokens / (wall - min(t for _, t, _, _ in out)), [text for *_, text in out]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--model-lib")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--draft-length", type=int, default=4)
    ap.add_argument("--draft-model", help="small_draft too, with this draft model folder (lib: DIR/lib/cpu.so)")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    lib = a.model_lib or f"{a.model}/lib/cpu.so"
    overrides = "max_num_sequence=4;max_total_seq_length=8192"

    def engine(**kw):
        return MLCEngine(a.model, model_lib=lib, device="cpu", mode="server", overrides=overrides,
                         engine_config=EngineConfig(mode="server", **kw))

    engines = {"cache_off": engine(prefix_cache_mode="disable"), "cache_on": engine(),
               "ngram_fixed": engine(prefix_cache_mode="disable", speculative_mode="ngram",
                                     spec_draft_length=a.draft_length),
               "ngram_auto": engine(prefix_cache_mode="disable", speculative_mode="ngram")}
    if a.draft_model:
        for name, length in (("draft_fixed", a.draft_length), ("draft_auto", None)):
            engines[name] = engine(prefix_cache_mode="disable", speculative_mode="small_draft",
                                   spec_draft_length=length,
                                   additional_models=[f"{a.draft_model},{a.draft_model}/lib/cpu.so"])
    spec_names = [n for n in engines if n.endswith(("_fixed", "_auto"))]
    tasks = {"repeat": [f"Repeat this text exactly.\nText: {PARAGRAPH}\nRepeated text: {PARAGRAPH.split('.')[0]}"
                        for _ in range(4)],
             "free": [f"Write a short story about {t}." for t in TOPICS]}
    results: dict[str, list[float]] = {}

    def add(key, value):
        results.setdefault(key, []).append(value)

    try:
        for r in range(a.rounds):
            for name in ("cache_off", "cache_on"):  # interleaved: one round of each, in turn
                add(f"chat_turn5_ttft_s/{name}", chat_turn5(engines[name], TOPICS[r % len(TOPICS)]))
                add(f"shared_prefix_ttft_s/{name}", shared_prefix(engines[name], 10 * r + 1))
            for task, prompts in tasks.items():
                for c in (1, 4):
                    texts = {}
                    for name in ["cache_off", *spec_names]:
                        before = engines[name].metrics()
                        speed, texts[name] = decode_speed(engines[name], prompts, c)
                        add(f"decode_tok_s/{task}/c{c}/{name}", speed)
                        if name != "cache_off":
                            m = engines[name].metrics()
                            drafted = m["spec_draft_tokens"] - before["spec_draft_tokens"]
                            accepted = m["spec_accepted_tokens"] - before["spec_accepted_tokens"]
                            rows = m["spec_verify_rows"] - before["spec_verify_rows"]
                            add(f"accept_rate/{task}/c{c}/{name}", accepted / drafted if drafted else 0.0)
                            add(f"accept_len/{task}/c{c}/{name}", (accepted + rows) / rows if rows else 0.0)
                            assert texts[name] == texts["cache_off"], f"{name}: speculative greedy output differs"
            print(f"round {r + 1}/{a.rounds} done", flush=True)
    finally:
        for e in engines.values():
            e.terminate()
    summary = {k: spread(v) for k, v in results.items()}
    for k, v in summary.items():
        print(f"{k:45s} median {v['median']:8.3f}  [{v['min']:.3f} .. {v['max']:.3f}]")
    for what in ("chat_turn5_ttft_s", "shared_prefix_ttft_s"):
        on, off = results[f"{what}/cache_on"], results[f"{what}/cache_off"]
        print(f"{what}: cache off / on = {statistics.median([x / y for x, y in zip(off, on)]):.2f}x")
    for task in tasks:
        for c in (1, 4):
            off = results[f"decode_tok_s/{task}/c{c}/cache_off"]
            for name in spec_names:
                on = results[f"decode_tok_s/{task}/c{c}/{name}"]
                print(f"decode {task} c={c}: {name} / plain = "
                      f"{statistics.median([x / y for x, y in zip(on, off)]):.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rounds": a.rounds, "results": results, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
