"""Shared test helpers: build a model folder + library through the project's own steps, compare logits."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from mlc_llm import tensor_cache
from mlc_llm.serve.runner import ModelRunner

from .reference import NumpyLlama


def build_with_steps(source: str, quantization: str, out: Path, device: str = "cpu", **gen_kwargs) -> Path:
    from mlc_llm.steps.compile import compile_model
    from mlc_llm.steps.convert_weight import convert_weight
    from mlc_llm.steps.gen_config import gen_config

    gen_config(source, quantization, "chatml", out, **gen_kwargs)
    convert_weight(source, quantization, out, progress=False)
    lib = out / "lib" / f"{device}.so"
    compile_model(out, device, lib)
    return lib


def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's chi-square test; p-value by the Wilson-Hilferty approximation (no scipy needed)."""
    x, k = float(((observed - expected) ** 2 / expected).sum()), len(observed) - 1
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def reference_for(model_dir: Path) -> NumpyLlama:
    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    return NumpyLlama(tensor_cache.load_numpy(model_dir), chat["model_config"])


def max_logit_diff(model_dir: Path, lib: Path, prompts: list[list[int]], decode_steps: int) -> float:
    """batch_prefill of all prompts (ragged; in rounds of at most the model's prefill_chunk_size tokens per sequence,
    as the engine chunks them), then `decode_steps` batch_decode steps over all sequences, each step's logits compared
    with the numpy reference on the whole prefix. Returns the max |difference|."""
    runner = ModelRunner(model_dir, lib)
    ref = reference_for(model_dir)
    chunk = json.loads((model_dir / "mlc-chat-config.json").read_text())["prefill_chunk_size"]
    cache = runner.create_kv_cache(len(prompts), 1024, max(256, sum(min(len(p), chunk) for p in prompts)))
    seq_ids = list(range(len(prompts)))
    for s in seq_ids:
        runner.add_sequence(cache, s)
    seqs, last = [[] for _ in prompts], {}
    worst = 0.0
    while any(len(s) < len(p) for s, p in zip(seqs, prompts)):
        ids = [i for i in seq_ids if len(seqs[i]) < len(prompts[i])]
        parts = [prompts[i][len(seqs[i]):len(seqs[i]) + chunk] for i in ids]
        for i, part, row in zip(ids, parts, np.asarray(runner.batch_prefill(cache, ids, parts))):
            seqs[i] += part
            last[i] = row
    logits = [last[i] for i in seq_ids]
    for step in range(decode_steps + 1):
        for i, seq in enumerate(seqs):
            expected = ref.logits(seq)[-1]
            worst = max(worst, float(np.abs(logits[i] - expected).max()))
        if step == decode_steps:
            break
        nxt = [int(np.argmax(row)) for row in logits]  # greedy: the decode path a user gets
        for seq, t in zip(seqs, nxt):
            seq.append(t)
        logits = runner.batch_decode(cache, seq_ids, nxt)
    return worst
