"""Memory soak of the OpenAI-compatible server: rounds of mixed requests, the server's RSS after each round.

Start a server, then point this at it (its process id gives the RSS, read from /proc/PID/status):

    python -m mlc_llm serve artifacts/SmolLM2-135M-Instruct-q4f32_cpu \
        --model-lib artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu.so --device cpu --mode local --port 8123 &
    python bench/soak.py --url http://127.0.0.1:8123 --pid $! --rounds 25 --requests-per-round 200 --warmup-rounds 3

Each round sends --requests-per-round requests, --concurrency at a time, drawn from a fixed mix: chat completions
streamed and not, n = 1..3, stop strings, response_format json_schema (several small schemas) and json_object, a
forced tool call, and plain completions, all with max_tokens 8-32. After each round it prints the RSS, its change and
the KV-cache usage from /metrics; at the end, the RSS after the warm-up rounds, at the end, and the growth in %.

Exit status: 1 if any request failed (HTTP error, or an error event in a stream), 2 if the RSS grew more than
--max-growth percent after warm-up, else 0. --json-out writes the per-round numbers and the summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx

TOPICS = ["the sea", "a red bicycle", "prime numbers", "autumn rain", "a lost key", "coffee", "the moon", "trains"]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"},
                                      "temps": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
     "required": ["city", "sunny"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "why": {"type": "string"}},
     "required": ["answer"]},
    {"type": "object", "properties": {"title": {"type": "string"},
                                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
     "required": ["title", "tags"]},
]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


def make_request(rng: random.Random, model: str) -> tuple[str, str, dict]:
    """-> (kind, path, body): one request of the mix."""
    topic = rng.choice(TOPICS)
    msgs = [{"role": "user", "content": f"Write {rng.randint(1, 5)} short sentences about {topic}."}]
    body: dict = {"model": model, "messages": msgs, "max_tokens": rng.randint(8, 32), "temperature": 0.7}
    kind = rng.choice(["plain", "stream", "n", "stop", "json_schema", "json_object", "tool", "completion"])
    if kind == "stream":
        body.update(stream=True, stream_options={"include_usage": True}, n=rng.randint(1, 3))
    elif kind == "n":
        body["n"] = rng.randint(2, 3)
    elif kind == "stop":
        body["stop"] = rng.sample([".", "\n", " the", "!"], rng.randint(1, 2))
    elif kind == "json_schema":
        i = rng.randrange(len(SCHEMAS))
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i],
                                                                          "strict": rng.random() < 0.5}}
    elif kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif kind == "tool":
        msgs[0]["content"] = f"What is the weather in {rng.choice(['Paris', 'Lima', 'Oslo', 'Kyoto'])}?"
        body.update(tools=[WEATHER_TOOL], tool_choice=rng.choice(
            ["required", {"type": "function", "function": {"name": "get_weather"}}]))
    elif kind == "completion":
        body = {"model": model, "prompt": f"A short story about {topic}:", "max_tokens": body["max_tokens"],
                "stream": rng.random() < 0.5}
        return kind, "/v1/completions", body
    if rng.random() < 0.3 and kind != "stream":
        body["stream"] = True
    return kind, "/v1/chat/completions", body


async def send(client: httpx.AsyncClient, path: str, body: dict) -> None:
    """Raises on any failure: an HTTP error status, an error event in a stream, a stream without [DONE]."""
    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        if len(r.json()["choices"]) != body.get("n", 1):
            raise RuntimeError(f"expected {body.get('n', 1)} choices: {r.text[:300]}")
        return
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        done = False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and '"error"' in line and "error" in json.loads(line[6:]):
                raise RuntimeError(f"stream error: {line[:300]}")
        if not done:
            raise RuntimeError("stream ended without [DONE]")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the process in MB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def kv_usage(client: httpx.AsyncClient) -> float:
    """KV usage once the prefix cache is dropped: what the finished requests left behind (0 unless a leak)."""
    (await client.post("/reset_prefix_cache")).raise_for_status()
    text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("mlc_llm:kv_cache_usage_perc"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def run_round(client: httpx.AsyncClient, rng: random.Random, model: str, n: int,
                    concurrency: int) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(kind: str, path: str, body: dict) -> None:
        async with sem:
            try:
                await send(client, path, body)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                errors.append(f"{kind}: {type(e).__name__}: {e}")

    await asyncio.gather(*(one(*make_request(rng, model)) for _ in range(n)))
    return errors


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8123")
    ap.add_argument("--pid", type=int, required=True, help="the server's process id (for its RSS)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests-per-round", type=int, default=200)
    ap.add_argument("--warmup-rounds", type=int, default=2, help="rounds before the RSS baseline")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, in percent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", help="write per-round numbers and the summary here")
    args = ap.parse_args()
    if not 0 <= args.warmup_rounds < args.rounds:
        ap.error("--warmup-rounds must be below --rounds")

    rng = random.Random(args.seed)
    rounds, n_errors = [], 0
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start_rss, _ = rss_mb(args.pid)
        print(f"start: RSS {start_rss:.1f} MB", flush=True)
        prev = start_rss
        for i in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            errors = await run_round(client, rng, model, args.requests_per_round, args.concurrency)
            secs = time.perf_counter() - t0
            rss, hwm = rss_mb(args.pid)
            kv = await kv_usage(client)
            n_errors += len(errors)
            rounds.append({"round": i, "seconds": round(secs, 2), "errors": len(errors), "rss_mb": round(rss, 1),
                           "peak_rss_mb": round(hwm, 1), "kv_cache_usage": kv})
            tag = " (warm-up)" if i <= args.warmup_rounds else ""
            print(f"round {i:3d}{tag}: {args.requests_per_round} requests in {secs:6.1f} s, {len(errors)} errors, "
                  f"RSS {rss:8.1f} MB ({rss - prev:+7.1f}), peak {hwm:8.1f} MB, KV usage {kv:.3f}", flush=True)
            for e in errors[:5]:
                print(f"    {e}", flush=True)
            prev = rss

    base = rounds[args.warmup_rounds - 1]["rss_mb"] if args.warmup_rounds else start_rss
    end = rounds[-1]["rss_mb"]
    growth = 100 * (end - base) / base
    ok = growth <= args.max_growth
    summary = {"requests": args.rounds * args.requests_per_round, "errors": n_errors, "start_rss_mb": start_rss,
               "rss_after_warmup_mb": base, "rss_end_mb": end, "growth_pct": round(growth, 2),
               "max_rss_mb": max(r["rss_mb"] for r in rounds), "within_limit": ok}
    print(f"summary: {summary['requests']} requests, {n_errors} errors; RSS after warm-up {base:.1f} MB, at the end "
          f"{end:.1f} MB: {growth:+.2f}% ({'within' if ok else 'OVER'} {args.max_growth:g}%)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds, "summary": summary}, f, indent=1)
    return 1 if n_errors else 0 if ok else 2


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
