"""Isolated decode attention over the paged KV cache: TVM's stock CPU kernel vs ours (`compiler/cpu_attention.py`)
with and without splitting a sequence's pages among tasks, at SmolLM2-135M's shapes (9 query heads, 3 KV heads,
head_dim 64, float32, 16-row pages); then TVM's RoPE + split kernel vs ours (results must be bit-identical), and
TVM's ragged prefill attention vs ours, the vector kernel and on CPUs with AMX-BF16 the AMX one (one causal sequence of
`--prefill` tokens).

    .venv/bin/python bench/attention.py [--contexts 128 1000] [--batches 1 8] [--splits 1 8 16 32] [--repeat 7]
        [--shape 12,2,128] [--layers 28] [--sequential-pages] [--against OLD_CHECKOUT]

Every variant is first checked against the stock kernel; times are medians over `--repeat` of the mean call (the KV
pages of one layer, hot in cache unless the context is long; `--layers N`: N layers' pages walked in turn, read from
memory as in a decode step). "split N" = SPLIT_TASKS N (1: one task per (sequence, KV head)); `--against` adds the
decode kernel of another checkout (e.g. a `git worktree` of an older commit) as a column, checked bit-identical.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# all cores, as the engine runs (mlc_llm/serve/runner.py): TVM's own default was 1 thread on the 2-core VM
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def _time(f, args, repeat: int, number: int = 20) -> float:
    """Median over `repeat` of the mean of `number` calls, in microseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            f(*args)
        runs.append((time.perf_counter() - start) / number)
    return statistics.median(runs) * 1e6


def rope_table(dev, target, repeat: int) -> None:
    """TVM's `tir_split_rotary` vs ours (`cpu_attention.rope_kernel`) on the fused qkv of 1, 8 and 128 tokens."""
    import tvm
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    from mlc_llm.compiler import cpu_attention

    hq, hkv, d, theta = 9, 3, 64, 100000.0
    build = lambda f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),  # noqa: E731
                                  target=target)["main"]
    stock = build(llama_rope_with_position_map(theta, 1.0, d, hq, hkv, "float32", {}, d))
    ours = build(cpu_attention.rope_kernel(hq, hkv, d, "float32", theta))
    print("\n| tokens | stock RoPE us | ours us | stock / ours |\n|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in (1, 8, 128):
        t = lambda x: tvm.runtime.tensor(x, dev)  # noqa: E731
        qkv, pos = t(rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float32)), t(np.arange(n, dtype=np.int32))
        results, times = [], []
        for f in (stock, ours):
            outs = [t(np.zeros((n, h, d), np.float32)) for h in (hq, hkv, hkv)]
            f(qkv, pos, *outs, 1)
            results.append([o.numpy() for o in outs])
            times.append(_time(f, (qkv, pos, *outs, 1), repeat))
        assert all(np.array_equal(x, y) for x, y in zip(*results))
        print(f"| {n} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.1f} |", flush=True)


def ragged_table(dev, target, repeat: int, lengths: list[int]) -> None:
    """TVM's ragged prefill attention (new tokens against themselves, causal) vs ours (vector kernel, and the AMX
    kernel where the CPU has AMX-BF16), one sequence of n tokens; each checked against the stock kernel first."""
    import tvm
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_ragged_cpu

    from mlc_llm.compiler import cpu_attention
    from mlc_llm.compiler.cpu.amx import has_amx

    hq, hkv, d = 9, 3, 64
    build = lambda f: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),  # noqa: E731
                                  target=target)["main"]
    kernels = {"stock ragged prefill": build(_attention_prefill_ragged_cpu(hkv, hq, d, d, "float32", {})),
               "ours": build(cpu_attention.ragged_prefill_kernel(hq, hkv, d, "float32"))}
    if has_amx(target):
        kernels["ours, AMX"] = build(cpu_attention.ragged_prefill_kernel(hq, hkv, d, "float32", amx=True))
    names = list(kernels)
    print("\n| prompt tokens | " + " | ".join(f"{n} us" for n in names) + " | "
          + " | ".join(f"stock / {n}" for n in names[1:]) + " |\n" + "|---" * (2 * len(names)) + "|")
    rng = np.random.default_rng(0)
    t = lambda x: tvm.runtime.tensor(x, dev)  # noqa: E731
    for n in lengths:
        q = t(rng.standard_normal((n, hq, d)).astype(np.float32))
        k, v = (t(rng.standard_normal((n, hkv, d)).astype(np.float32)) for _ in range(2))
        indptr, zeros = t(np.array([0, n], np.int32)), t(np.zeros(n, np.int32))
        results, times = [], []
        for f in kernels.values():
            out, lse = t(np.zeros((n, hq, d), np.float32)), t(np.zeros((n, hq), np.float32))
            call = (q, indptr, k, v, indptr, zeros, t(np.zeros(1, np.int32)), out, lse, 1, 0, 1.0, 10000.0, d ** -0.5)
            f(*call)
            results.append(out.numpy())
            times.append(_time(f, call, repeat, number=3))
        for r in results[1:]:  # the AMX kernel's operands have 16 significant bits: ~2e-5 from float64
            np.testing.assert_allclose(r, results[0], rtol=1e-4, atol=5e-5)
        print(f"| {n} | " + " | ".join(f"{x:.0f}" for x in times) + " | "
              + " | ".join(f"{times[0] / x:.1f}" for x in times[1:]) + " |", flush=True)


def _old_decode_kernel(checkout: str, *args):
    """`decode_kernel(*args)` of another checkout's mlc_llm package (imported whole, as scripts/kernel_snapshot.py
    does)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from kernel_snapshot import package_of

    with package_of(checkout):
        from mlc_llm.compiler import cpu_attention
        return cpu_attention.decode_kernel(*args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1000])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--shape", default="9,3,64", help="query heads, KV heads, head_dim (default: SmolLM2-135M's)")
    ap.add_argument("--layers", type=int, default=1,
                    help="KV pages of this many layers, walked in turn by the timed calls: beyond the caches, reads "
                         "come from memory as in a decode step (default 1: one layer's pages, hot in cache)")
    ap.add_argument("--sequential-pages", action="store_true",
                    help="each sequence's pages in order in the cache (a fresh cache), not shuffled")
    ap.add_argument("--against", metavar="OLD_CHECKOUT",
                    help="add the decode kernel of another checkout (default split), which must agree bit for bit")
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 512], help="prompt lengths for the ragged table")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()

    import tvm
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    from mlc_llm.compiler import cpu_attention

    hq, hkv, d = (int(x) for x in a.shape.split(","))
    page = cpu_attention.PAGE
    dev = tvm.cpu()
    target = tvm.target.Target.from_device(dev)

    def build(func):
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]

    default = cpu_attention.SPLIT_TASKS
    if a.against and default not in a.splits:  # the column the other checkout's kernel is compared with
        a.splits.append(default)
    kernels = {"stock": build(_attention_decode_cpu(hkv, hq, d, "float32", False, {}))}
    if a.against:
        kernels["against"] = build(_old_decode_kernel(a.against, hq, hkv, d, "float32"))
    for n in a.splits:
        cpu_attention.SPLIT_TASKS = n
        kernels[f"split {n}"] = build(cpu_attention.decode_kernel(hq, hkv, d, "float32"))
    cpu_attention.SPLIT_TASKS = default
    names = list(kernels)
    print(f"shape {hq},{hkv},{d}; {a.layers} layer(s) of KV pages; pages "
          f"{'in order' if a.sequential_pages else 'shuffled'}")
    print(f"| B | context | " + " | ".join(f"{n} us" for n in names) + " | stock / best |"
          + (" against / default |" if a.against else ""))
    print("|---" * (len(names) + 3 + bool(a.against)) + "|")
    rng = np.random.default_rng(0)
    t = lambda x: tvm.runtime.tensor(x, dev)  # noqa: E731
    for b in a.batches:
        for ctx in a.contexts:
            per_seq = -(-ctx // page)
            indptr = t((np.arange(b + 1) * per_seq).astype(np.int32))
            last = t(np.full(b, (ctx - 1) % page + 1, np.int32))
            zeros = t(np.zeros(b, np.int32))
            layers = []
            for _ in range(a.layers):
                pages = rng.standard_normal((b * per_seq, 2, hkv, page, d)).astype(np.float32)
                order = np.arange(b * per_seq) if a.sequential_pages else rng.permutation(b * per_seq)
                q = rng.standard_normal((b, hq, d)).astype(np.float32)
                layers.append([t(q), t(pages), indptr, t(order.astype(np.int32)), last, zeros, zeros])
            times, results = [], []
            for name in names:
                calls = [(*args, t(np.zeros((b, hq, d), np.float32)), t(np.zeros((b, hq), np.float32)), 0, 1.0,
                          10000.0, d ** -0.5) for args in layers]
                kernels[name](*calls[0])
                results.append((calls[0][7].numpy(), calls[0][8].numpy()))
                np.testing.assert_allclose(results[-1][0], results[0][0], rtol=1e-4, atol=1e-5)

                def walk(calls=calls, f=kernels[name]):
                    for call in calls:
                        f(*call)
                times.append(_time(walk, (), a.repeat) / a.layers)
            if a.against:  # the same arithmetic in the same order: equal bits
                default_at = names.index(f"split {default}")
                for x, y in zip(results[names.index("against")], results[default_at]):
                    assert np.array_equal(x, y), "the --against kernel's output differs from this tree's"
            best = min(times[1:]) if len(times) > 1 else times[0]
            cells = f"| {b} | {ctx} | " + " | ".join(f"{x:.1f}" for x in times) + f" | {times[0] / best:.1f} |"
            if a.against:
                cells += f" {times[names.index('against')] / times[default_at]:.2f} |"
            print(cells, flush=True)
    rope_table(dev, target, a.repeat)
    if a.prefill:
        ragged_table(dev, target, a.repeat, a.prefill)


if __name__ == "__main__":
    main()
