"""`mlc_llm bench serve`: a closed-loop serving benchmark client for any OpenAI-compatible server.

Field names and metrics follow `vllm bench serve` (completed, request_throughput, output_throughput, mean/median/p99
of ttft_ms, tpot_ms, itl_ms, e2el_ms), so its numbers sit next to vLLM's and SGLang's. Prompts are random token ids
of an exact length sent to /v1/completions (or random words to /v1/chat/completions), with `ignore_eos` and
`max_tokens` fixing the output length; every request streams, and times come from the SSE events as they arrive.
"""
from __future__ import annotations

import asyncio
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see").split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


def _percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    s = sorted(values)
    p99 = s[min(len(s) - 1, max(0, int(round(0.99 * (len(s) - 1)))))]
    return {"mean": statistics.fmean(s) * scale, "median": statistics.median(s) * scale, "p99": p99 * scale}


def make_prompts(n: int, input_len: int, chat: bool, vocab_size: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    if chat:
        return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]
    # Ids away from the special tokens at the start of most vocabularies.
    return [[rng.randrange(256, vocab_size) for _ in range(input_len)] for _ in range(n)]


async def _one(client, url: str, headers: dict[str, str], body: dict[str, Any], chat: bool) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = chunk["error"].get("message", str(chunk["error"]))
                    return res
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    text = choice["delta"].get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if res.ttft == 0.0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft > 0
        if not res.ok:
            res.error = "no tokens came back"
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(base_url: str, model: str, prompts: list[Any], output_len: int, concurrency: int, chat: bool,
                    api_key: Optional[str], timeout: float) -> dict[str, Any]:
    import httpx

    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)

    def body(p):
        b = {"model": model, "max_tokens": output_len, "max_completion_tokens": output_len, "temperature": 0,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if chat:
            b["messages"] = [{"role": "user", "content": p}]
            del b["max_tokens"]
        else:
            b["prompt"] = p
            del b["max_completion_tokens"]
        return b

    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        async def bounded(p):
            async with sem:
                return await _one(client, url, headers, body(p), chat)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        duration = time.perf_counter() - start
    return summarize(results, duration, concurrency)


def summarize(results: list[RequestResult], duration: float, concurrency: int) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "max_concurrency": concurrency, "completed": len(ok), "failed": len(results) - len(ok),
        "duration": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpots), ("itl", [x for r in ok for x in r.itl]),
                         ("e2el", [r.e2e for r in ok])):
        for stat, v in _percentiles(values).items():
            summary[f"{stat}_{name}_ms"] = v
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"{' Serving Benchmark Result (concurrency ' + str(s['max_concurrency']) + ') ':=^60}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", s["duration"]), ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", s["request_throughput"]),
            ("Output token throughput (tok/s)", s["output_throughput"]),
            ("Total token throughput (tok/s)", s["total_token_throughput"])]
    for label, key in (("Time to First Token", "ttft"), ("Time per Output Token (excl. 1st token)", "tpot"),
                       ("Inter-token Latency", "itl"), ("End-to-end Latency", "e2el")):
        rows.append((f"-{label}-", None))
        for stat in ("mean", "median", "p99"):
            rows.append((f"{stat.capitalize() if stat != 'p99' else 'P99'} {key.upper()} (ms)", s[f"{stat}_{key}_ms"]))
    for label, value in rows:
        if value is None:
            print(f"{label:-^60}")
        elif isinstance(value, float):
            print(f"{label:<44}{value:>16.2f}")
        else:
            print(f"{label:<44}{value:>16}")
    for label, key in (("Spec decode acceptance rate", "spec_accept_rate"),
                       ("Spec decode tokens per verify step", "spec_accept_len"),
                       ("Prefix cache hit rate", "prefix_cache_hit_rate")):
        if key in s:
            print(f"{label:<44}{s[key]:>16.2f}")
    for e in s["errors"]:
        print(f"error: {e}")
    print("=" * 60)


SERVER_COUNTERS = ("spec_draft_tokens_sum", "spec_accepted_tokens_sum", "spec_verify_steps_sum",
                   "prefix_cache_hit_tokens_sum", "prefix_cache_prompt_tokens_sum")


def server_counters(base_url: str) -> dict[str, float]:
    """This project's engine counters from the server's /metrics (empty for other servers)."""
    import httpx

    try:
        text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=30).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith("mlc_llm:") and name[8:] in SERVER_COUNTERS:
            out[name[8:]] = out.get(name[8:], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def engine_rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Speculation acceptance and prefix-cache hits during one level, from the counters' differences."""
    if not before or not after:
        return {}
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SERVER_COUNTERS}
    out = {}
    if d["spec_draft_tokens_sum"]:
        out["spec_accept_rate"] = d["spec_accepted_tokens_sum"] / d["spec_draft_tokens_sum"]
        out["spec_accept_len"] = (d["spec_accepted_tokens_sum"] + d["spec_verify_steps_sum"]) / \
            max(d["spec_verify_steps_sum"], 1)
    if d["prefix_cache_prompt_tokens_sum"]:
        out["prefix_cache_hit_rate"] = d["prefix_cache_hit_tokens_sum"] / d["prefix_cache_prompt_tokens_sum"]
    return out


def served_model(base_url: str, api_key: Optional[str]) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def bench_serve(base_url: str, model: Optional[str], concurrencies: list[int], num_prompts: Optional[int],
                input_len: int, output_len: int, chat: bool, vocab_size: int, seed: int, api_key: Optional[str],
                result_json: Optional[str], timeout: float = 3600.0) -> list[dict[str, Any]]:
    model = model or served_model(base_url, api_key)
    # One short warm-up request so that no level pays for first-use costs.
    asyncio.run(run_level(base_url, model, make_prompts(1, 8, chat, vocab_size, seed + 999), 4, 1, chat, api_key,
                          timeout))
    all_results = []
    for c in concurrencies:
        n = num_prompts or 2 * c
        prompts = make_prompts(n, input_len, chat, vocab_size, seed)
        before = server_counters(base_url)
        s = asyncio.run(run_level(base_url, model, prompts, output_len, c, chat, api_key, timeout))
        s.update(engine_rates(before, server_counters(base_url)))
        s.update(num_prompts=n, input_len=input_len, output_len=output_len, endpoint="chat" if chat else "completions",
                 model=model, base_url=base_url, machine=f"{platform.node()} {platform.machine()}")
        print_summary(s)
        all_results.append(s)
    if result_json:
        with open(result_json, "w", encoding="utf-8") as f:
            json.dump(all_results, f, indent=2)
    return all_results

