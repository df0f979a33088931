"""Decode step time of model libraries side by side, in one process, interleaved (the machines here drift by 1.5x
within minutes, so variants are compared round by round, never run after one another).

    .venv/bin/python bench/decode_step.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu LIB_A.so LIB_B.so \
        [--contexts 100 1000] [--rounds 7] [--steps 48]

For each round, context and library: a fresh KV cache, a prefill of `context` random token ids, then `steps` greedy
batch-1 `batch_decode` calls through ModelRunner (no engine thread, no sampling beyond argmax); the round's value is the
median step. Prints the median [min-max] over rounds per library and context (and for the other libraries the
median [min-max] over rounds of the first library's step / theirs), the first greedy tokens of each library
(they must agree), and per library the median over rounds of step(first context) / step(last context).
`--huge-pages both` runs every library twice, weights in 4 KB pages ("[4k]", TVM's loader) and in the huge-page arena
("[huge]", the runner's default on Linux; `mlc_llm/serve/weight_arena.py`).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="artifact folder (weights, mlc-chat-config.json)")
    ap.add_argument("libs", nargs="+", help="model libraries compiled for it")
    ap.add_argument("--contexts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--huge-pages", choices=("on", "off", "both"), default="on",
                    help="weights in the huge-page arena (on), in TVM's 4 KB pages (off), or each library both ways")
    a = ap.parse_args()

    from mlc_llm.serve.runner import ModelRunner

    modes = {"on": [True], "off": [False], "both": [False, True]}[a.huge_pages]
    variants = [(lib, huge) for lib in a.libs for huge in modes]
    runners = [ModelRunner(a.model, lib, "cpu", huge_pages=huge) for lib, huge in variants]
    a.libs = [f"{lib} [{'huge' if huge else '4k'}]" if a.huge_pages == "both" else lib for lib, huge in variants]
    for name, run in zip(a.libs, runners):
        if run.arena is not None:
            print(f"{name}: {run.arena.huge_page_bytes() / 1e6:.0f} of {run.arena.bytes.nbytes / 1e6:.0f} MB of "
                  "weights in huge pages")
    rng = random.Random(0)
    steps = {(lib, c): [] for lib in a.libs for c in a.contexts}
    first_tokens = {}
    for _ in range(a.rounds):
        for ctx in a.contexts:
            prompt = [rng.randrange(256, runners[0].vocab_size) for _ in range(ctx)]
            for lib, run in zip(a.libs, runners):
                cache = run.create_kv_cache(1, ctx + a.steps + 16, 2048)
                run.add_sequence(cache, 0)
                token = int(run.batch_prefill(cache, [0], [prompt])[0].argmax())
                times, tokens = [], []
                for _ in range(a.steps):
                    start = time.perf_counter()
                    logits = run.batch_decode(cache, [0], [token])
                    times.append(time.perf_counter() - start)
                    token = int(logits[0].argmax())
                    tokens.append(token)
                steps[(lib, ctx)].append(statistics.median(times))
                first_tokens.setdefault((lib, ctx), tokens[:8])
    for lib in a.libs:
        cells = []
        for ctx in a.contexts:
            v = [t * 1e3 for t in steps[(lib, ctx)]]
            cell = f"ctx {ctx}: {statistics.median(v):.2f} ms [{min(v):.2f}-{max(v):.2f}]"
            if lib != a.libs[0]:  # speed relative to the first library, round by round
                r = [x / y for x, y in zip(steps[(a.libs[0], ctx)], steps[(lib, ctx)])]
                cell += f" ({statistics.median(r):.3f}x the first [{min(r):.2f}-{max(r):.2f}])"
            cells.append(cell)
        line = f"{lib}: " + "; ".join(cells)
        if len(a.contexts) > 1:
            lo, hi = steps[(lib, a.contexts[0])], steps[(lib, a.contexts[-1])]
            line += f"; step {a.contexts[0]} / step {a.contexts[-1]}: {statistics.median(x / y for x, y in zip(lo, hi)):.3f}"
        print(line)
    for ctx in a.contexts:
        groups: dict[tuple[int, ...], list[str]] = {}
        for lib in a.libs:
            groups.setdefault(tuple(first_tokens[(lib, ctx)]), []).append(lib)
        if len(groups) == 1:
            print(f"ctx {ctx}: first greedy tokens agree: {list(next(iter(groups)))}")
        for toks, libs in (groups.items() if len(groups) > 1 else ()):
            print(f"ctx {ctx}: first greedy tokens {list(toks)}: {', '.join(libs)}")


if __name__ == "__main__":
    main()
