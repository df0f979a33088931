"""`mlc_llm bench latency`: llama-bench-style prefill and decode speed through the engine, plus a per-kernel profile.

Speeds come from what a user gets: one completions request at a time through MLCEngine (random token-id prompt of
exact length, greedy, ignore_eos), prefill tok/s = prompt tokens / time to first token, decode tok/s = generated
tokens after the first / the time they took. Each setting runs `--repeat` times; median and range are printed, and
decode speed is also given as achieved GB/s of weight reads (every weight is read once per decoded token at batch 1).

`--profile` times every call the Relax VM makes during one decode step (kernels and VM builtins) through the VM's
instrument hook, at a given context length and batch size: where the time of a token goes. `--profile-prefill N`
does the same for one prefill of N tokens (at most the model's prefill_chunk_size: one chunk).
"""
from __future__ import annotations

import collections
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Optional


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the weights a decode step reads: all of them, except an embedding table that is not also the
    lm_head (a step gathers one of its rows)."""
    index = json.loads((Path(model_dir) / "tensor-cache.json").read_text(encoding="utf-8"))
    params = [(p["name"], int(p["nbytes"])) for shard in index["records"] for p in shard["records"]]
    untied = any(name.startswith("lm_head.") for name, _ in params)
    return sum(n for name, n in params if not (untied and "embed_tokens." in name))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def _one(engine, prompt_len: int, gen_len: int, rng: random.Random) -> tuple[float, Optional[float]]:
    """One request of `prompt_len` random token ids: (prefill tok/s, decode tok/s or None)."""
    prompt = [rng.randrange(256, engine.runner.vocab_size) for _ in range(prompt_len)]
    r = engine.completions.create(prompt=prompt, max_tokens=gen_len, temperature=0, ignore_eos=True)
    extra = r.usage.extra
    return prompt_len / extra["ttft_s"], extra.get("decode_tokens_per_s")


def measure(engine, prompt_lens: list[int], gen_len: int, repeat: int, seed: int = 0) -> list[dict[str, Any]]:
    """`repeat` requests per prompt length, the lengths interleaved (one of each per repetition), so that drift of a
    shared machine hits them alike."""
    rng = random.Random(seed)
    samples = {n: ([], []) for n in prompt_lens}
    for _ in range(repeat):
        for n in prompt_lens:
            prefill, decode = _one(engine, n, gen_len, rng)
            samples[n][0].append(prefill)
            if decode:
                samples[n][1].append(decode)
    runs = []
    for n in prompt_lens:
        prefill, decode = samples[n]
        out = {"prompt_len": n, "gen_len": gen_len, "repeat": repeat, "prefill_tok_s": _spread(prefill)}
        if decode:
            out["decode_tok_s"] = _spread(decode)
            out["decode_samples"] = decode
        runs.append(out)
    return runs


def _time_vm_calls(runner, call) -> tuple[float, list[dict[str, Any]]]:
    """Run `call()` with the VM's instrument hook timing every kernel / builtin it calls: (wall s, rows by time)."""
    import tvm_ffi

    stats: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    started: dict[str, float] = {}

    def instrument(func, symbol, before, ret, *args):
        if before:
            started[symbol] = time.perf_counter()
        else:
            entry = stats[symbol]
            entry[0] += 1
            entry[1] += time.perf_counter() - started[symbol]
        return 0

    runner.vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        t = time.perf_counter()
        call()
        wall = time.perf_counter() - t
    finally:
        runner.vm.set_instrument(None)
    return wall, sorted(({"name": k, "calls": n, "ms": s * 1e3} for k, (n, s) in stats.items()), key=lambda r: -r["ms"])


def profile_decode(runner, context: int, batch: int = 1) -> dict[str, Any]:
    """Time every VM call of one batch_decode step (after a warm-up step) at `context` tokens per sequence."""
    cache = runner.create_kv_cache(batch, batch * (context + 8), min(context, 2048))
    rng = random.Random(0)
    for s in range(batch):
        runner.add_sequence(cache, s)
        prompt = [rng.randrange(256, runner.vocab_size) for _ in range(context)]
        for start in range(0, context, 2048):
            runner.batch_prefill(cache, [s], [prompt[start:start + 2048]])
    seqs = list(range(batch))
    runner.batch_decode(cache, seqs, [7] * batch)  # warm-up
    wall, rows = _time_vm_calls(runner, lambda: runner.batch_decode(cache, seqs, [8] * batch))
    return {"what": f"one decode step, batch {batch}, context {context}", "context": context, "batch": batch,
            "wall_ms": wall * 1e3, "calls": rows}


def _check_prefill_profile(runner, tokens: int) -> None:
    chunk = int(runner.metadata["prefill_chunk_size"])
    if tokens > chunk:
        raise ValueError(f"--profile-prefill {tokens}: the model library prefills at most {chunk} tokens at once "
                         "(prefill_chunk_size); profile a length up to that")


def profile_prefill(runner, tokens: int) -> dict[str, Any]:
    """Time every VM call of one batch_prefill of `tokens` random token ids into a fresh KV cache (after a warm-up
    prefill of the same length)."""
    _check_prefill_profile(runner, tokens)
    rng = random.Random(0)
    prompt = [rng.randrange(256, runner.vocab_size) for _ in range(tokens)]

    def fresh_cache():
        cache = runner.create_kv_cache(1, tokens + 8, tokens)
        runner.add_sequence(cache, 0)
        return cache

    runner.batch_prefill(fresh_cache(), [0], [prompt])  # warm-up
    cache = fresh_cache()
    wall, rows = _time_vm_calls(runner, lambda: runner.batch_prefill(cache, [0], [prompt]))
    return {"what": f"one prefill of {tokens} tokens", "tokens": tokens, "wall_ms": wall * 1e3, "calls": rows}


def print_profile(p: dict[str, Any], top: int = 15) -> None:
    total = sum(r["ms"] for r in p["calls"])
    builtins = sum(r["ms"] for r in p["calls"] if r["name"].startswith("vm.builtin.") and "attention" not in r["name"])
    print(f"{p['what']}: {p['wall_ms']:.2f} ms wall (kernels incl. KV-cache attention {total - builtins:.2f} ms, other "
          f"VM builtins {builtins:.2f} ms, the rest is Python + VM dispatch)")
    print(f"{'ms':>10} {'share':>6} {'calls':>6}  name")
    for r in p["calls"][:top]:
        print(f"{r['ms']:10.3f} {100 * r['ms'] / p['wall_ms']:5.1f}% {r['calls']:6d}  {r['name']}")


def bench_latency(model: str, model_lib: Optional[str], device: str, prompt_lens: list[int], gen_len: int,
                  repeat: int, profile: bool, profile_context: int, profile_batch: int,
                  result_json: Optional[str], profile_prefill_tokens: int = 0) -> dict[str, Any]:
    from .serve.engine import MLCEngine

    longest = max(prompt_lens) + gen_len + 16
    overrides = f"max_num_sequence={max(1, profile_batch)};max_total_seq_length={max(longest, 1024)}"
    with MLCEngine(model, model_lib=model_lib, device=device, mode="local", overrides=overrides) as engine:
        if profile_prefill_tokens:
            _check_prefill_profile(engine.runner, profile_prefill_tokens)  # before minutes of measuring
        nbytes = weight_bytes(engine.model_dir)
        result: dict[str, Any] = {"model": str(engine.model_dir), "device": engine.device,
                                  "threads": os.environ.get("TVM_NUM_THREADS"), "weight_bytes": nbytes,
                                  "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
                                  "runs": []}
        measure(engine, [8], 4, 1, seed=99)  # warm-up
        print(f"{result['model']} on {engine.device} ({result['machine']}, TVM_NUM_THREADS={result['threads']}), "
              f"weights {nbytes / 1e6:.1f} MB; median [min-max] of {repeat}, prompt lengths interleaved")
        result["runs"] = measure(engine, prompt_lens, gen_len, repeat)
        for m in result["runs"]:
            p = m["prefill_tok_s"]
            line = f"  pp{m['prompt_len']}: {p['median']:8.1f} tok/s [{p['min']:.1f}-{p['max']:.1f}]"
            if "decode_tok_s" in m:
                d = m["decode_tok_s"]
                gbs = nbytes * d["median"] / 1e9
                m["decode_weight_GBps"] = gbs
                line += (f"   tg{gen_len} after it: {d['median']:8.1f} tok/s [{d['min']:.1f}-{d['max']:.1f}]"
                         f" = {gbs:.2f} GB/s of weights")
            print(line, flush=True)
        first, last = result["runs"][0], result["runs"][-1]
        if len(result["runs"]) > 1 and first.get("decode_samples") and last.get("decode_samples") and \
                len(first["decode_samples"]) == len(last["decode_samples"]):
            ratios = [b / a for a, b in zip(first["decode_samples"], last["decode_samples"])]
            result["decode_ratio_last_first"] = _spread(ratios)
            r = result["decode_ratio_last_first"]
            print(f"  decode after pp{last['prompt_len']} / after pp{first['prompt_len']}, per repetition: "
                  f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]")
        if profile:
            result["profile"] = profile_decode(engine.runner, profile_context, profile_batch)
            print_profile(result["profile"])
        if profile_prefill_tokens:
            result["prefill_profile"] = profile_prefill(engine.runner, profile_prefill_tokens)
            print_profile(result["prefill_profile"])
    if result_json:
        Path(result_json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result
