"""Where a decode step's time goes, by sampling (no instrumentation): `perf record` on a process that decodes in a loop
at a fixed context, samples attributed to the model library's kernels (its symbol table: each parallel task's code
follows its kernel's `*_compute_` function) and to the other shared objects (the TVM runtime, the kernel's
`sched_yield` of an idle pool thread, Python). `--prefill N` samples prefills instead: the child prefills the same N
random tokens into a fresh sequence again and again (one `batch_prefill` each, then the sequence is removed).

    .venv/bin/python bench/sample_profile.py artifacts/SmolLM2-135M-Instruct-q4f32_cpu \
        [--model-lib LIB] [--context 128] [--steps 64] [--seconds 8] [--batch 1] [--prefill N]

The child process prefills `--context` random tokens per sequence once, then decodes `--steps` greedy steps and pops
them from the KV cache, again and again (the context stays within [context, context + steps], no prefill is
sampled); perf attaches after a warm-up and records
`--seconds` at 4 kHz. Shares are of all samples of both threads (idle spinning included: `[kernel]` is mostly the
pool's `sched_yield`). `--per-thread`: each thread's samples per kernel too, and the most over the fewest (how
unevenly a kernel's work ran). `--batch N` decodes N sequences per step. Needs `perf` (linux-perf) and
perf_event_paranoid <= 2 for a process of the same user. The instrumented per-kernel profile is `mlc_llm bench latency --profile`
(it adds a synchronization per kernel: shares there are of a slower step).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The child processes: load the library, then loop, reporting (time, units done) to the progress file after each round
_HEAD = """
import os, random, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from mlc_llm.serve.runner import ModelRunner
r = ModelRunner({model!r}, {lib!r}, "cpu")
rng = random.Random(0)
"""
_REPORT = """
    with open({progress!r} + ".tmp", "w") as f:
        f.write(f"{{time.perf_counter()}} {{done}}")
    os.replace({progress!r} + ".tmp", {progress!r})
"""
_CHILD = _HEAD + """
prompts = [[rng.randrange({vocab}) for _ in range({context})] for _ in range({batch})]
ids = list(range({batch}))
cache = r.create_kv_cache({batch}, {context} + {steps} + 8, 2048)
for i in ids:
    r.add_sequence(cache, i)
first = [int(np.argmax(row)) for row in r.batch_prefill(cache, ids, prompts)]
print("ready", flush=True)
done = 0
while True:
    toks = first
    for _ in range({steps}):
        toks = [int(t) for t in np.argmax(r.batch_decode(cache, ids, toks), axis=-1)]
    for i in ids:
        r.popn(cache, i, {steps})
    done += {steps}""" + _REPORT
_PREFILL_CHILD = _HEAD + """
prompt = [rng.randrange({vocab}) for _ in range({tokens})]
cache = r.create_kv_cache(1, {tokens} + 8, {tokens})
print("ready", flush=True)
done = 0
while True:
    r.add_sequence(cache, 0)
    r.batch_prefill(cache, [0], [prompt])
    r.remove_sequence(cache, 0)
    done += 1""" + _REPORT


def _symbols(lib: str) -> tuple[list[int], list[str]]:
    out = subprocess.run(["nm", lib], capture_output=True, text=True, check=True).stdout
    syms = sorted((int(p[0], 16), p[2]) for p in (line.split() for line in out.splitlines())
                  if len(p) == 3 and p[1] in "tT")
    return [a for a, _ in syms], [n.replace("_compute_", "").replace("__tvm_ffi_", "") for _, n in syms]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--model-lib")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before perf attaches (load + first rounds)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--prefill", type=int, metavar="N", help="sample prefills of N tokens instead of decode steps")
    ap.add_argument("--per-thread", action="store_true",
                    help="also each thread's samples per kernel (a kernel lasts as long as its slowest thread)")
    a = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("perf is not installed (Debian: apt-get install linux-perf)")
    lib = str(Path(a.model_lib or Path(a.model) / "lib" / "cpu.so").resolve())
    import json

    vocab = json.loads((Path(a.model) / "mlc-chat-config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        data, progress = os.path.join(tmp, "perf.data"), os.path.join(tmp, "progress")
        if a.prefill:
            code = _PREFILL_CHILD.format(root=str(ROOT), model=a.model, lib=lib, vocab=vocab, tokens=a.prefill,
                                         progress=progress)
        else:
            code = _CHILD.format(root=str(ROOT), model=a.model, lib=lib, vocab=vocab, context=a.context,
                                 steps=a.steps, batch=a.batch, progress=progress)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            if child.stdout.readline().strip() != "ready":
                sys.exit("the decode / prefill loop did not start")
            time.sleep(a.warmup)
            before = Path(progress).read_text().split()
            subprocess.run(["perf", "record", "-g", "-F", "4000", "-p", str(child.pid), "-o", data, "--", "sleep",
                            str(a.seconds)], check=True, capture_output=True)
            after = Path(progress).read_text().split()
        finally:
            child.kill()
            child.wait()
        script = subprocess.run(["perf", "script", "-i", data, "-F", "tid,ip,dso", "--max-stack=1"],
                                capture_output=True, text=True, check=True).stdout
    addrs, names = _symbols(lib)
    base = os.path.basename(lib)
    counts: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[tuple[int, str]] = collections.Counter()
    tid = 0
    for line in script.splitlines():  # a sample: "TID" then its (leaf) frame "IP (DSO)" on the next line
        parts = line.split()
        if len(parts) == 1 and parts[0].isdigit():
            tid = int(parts[0])
            continue
        if len(parts) < 2:
            continue
        dso = parts[1].strip("()")
        if os.path.basename(dso) == base:
            i = bisect.bisect_right(addrs, int(parts[0], 16)) - 1
            name = names[i] if i >= 0 else "?"
        else:
            name = f"[{os.path.basename(dso)}]"
        counts[name] += 1
        per_thread[(tid, name)] += 1
    total = sum(counts.values())
    step_ms = (float(after[0]) - float(before[0])) / (int(after[1]) - int(before[1])) * 1e3
    what = (f"prefill of {a.prefill} tokens" if a.prefill else
            f"decode at context {a.context}..{a.context + a.steps}, batch {a.batch}")
    print(f"{lib}: {what}: {step_ms:.2f} ms per {'prefill' if a.prefill else 'step'} "
          f"while sampled; {total} samples ({a.seconds:.0f} s x 4 kHz x threads); "
          f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}")
    threads = total / (a.seconds * 4000)  # samples per second of wall time / the sampling rate
    tids = sorted({t for t, _ in per_thread}, key=lambda t: (t != child.pid, t))  # the main thread's tid is the pid
    head = f"  share   thread-ms per {'prefill' if a.prefill else 'step'}   (sampled threads: {threads:.1f})"
    if a.per_thread and len(tids) > 1:
        head += (f"; samples per thread (tids {', '.join(map(str, tids))}, the main thread first), "
                 f"the most / the fewest")
    print(head)
    for name, n in counts.most_common(a.top):
        line = f"  {100 * n / total:5.1f} %  {n / total * step_ms * threads:6.2f}  {name}"
        if a.per_thread and len(tids) > 1:
            by = [per_thread[(t, name)] for t in tids]
            line += f"   {' / '.join(map(str, by))}   {max(by) / max(min(by), 1):.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
