"""Shared test helpers: build a model folder + library through the project's own steps, compare logits."""
from __future__ import annotations

import json
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


def reference_for(model_dir: Path) -> NumpyLlama:
    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    return NumpyLlama(tensor_cache.load_numpy(model_dir), chat["model_config"])


def max_logit_diff(model_dir: Path, lib: Path, prompts: list[list[int]], decode_steps: int) -> float:
    """batch_prefill of all prompts (ragged), then `decode_steps` batch_decode steps over all sequences, each step's
    logits compared with the numpy reference on the whole prefix. Returns the max |difference|."""
    runner = ModelRunner(model_dir, lib)
    ref = reference_for(model_dir)
    cache = runner.create_kv_cache(len(prompts), 1024, 256)
    seq_ids = list(range(len(prompts)))
    for s in seq_ids:
        runner.add_sequence(cache, s)
    seqs = [list(p) for p in prompts]
    worst = 0.0
    logits = runner.batch_prefill(cache, seq_ids, seqs)
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
