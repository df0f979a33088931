"""Compiled logits against an independent float64 numpy Llama on the same (dequantized) weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from mlc_llm import tensor_cache
from mlc_llm.serve.config import EngineConfig, resolve
from mlc_llm.serve.runner import ModelRunner

from .conftest import run_snakemake
from .helpers import build_with_steps, max_logit_diff, reference_for
from .reference import NumpyLlama
from .tiny_hf import write_tiny_hf

TOL = 1e-3
# prefill GEMMs on bf16-rounded inputs (device.prefill_precision=bf16): 0.18 measured on LONG_TEXT (std of the
# logits: 3.5)
BF16_TOL = 0.5
# decode GEMVs on int8 activations (device.decode_precision=int8): 0.78 measured (decode steps of the test prompts
# against the float64 reference on the same prefix; std of the logits: 4.0)
INT8_TOL = 1.5
# KV cache pages in float16 (device.kv_cache_dtype=float16): 0.024 measured (the five prompts and 4 decode steps)
KV16_TOL = 0.1


# 66 tokens: one sequence over several 16-token tiles of the ragged prefill attention (the short prompts fit in one)
LONG_TEXT = ("The history of the city begins in the Roman era, when a small settlement grew on the banks of the river. "
             "Over the centuries it became a center of trade, art and learning, and today it is known for its "
             "museums, its food and its long summer evenings. Visitors often ask what to see first, and the answer is")


def smollm_prompts(model_dir) -> list[list[int]]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a land far away, "
             "there lived a", "1 2 3 4", LONG_TEXT]
    return [tok.encode(t).ids for t in texts]


@pytest.mark.parametrize("fixture", ["smollm_q0", "smollm_q4", "smollm_q4_f16scale"])
def test_smollm2_logits_match_numpy(fixture, request):
    art = request.getfixturevalue(fixture)
    diff = max_logit_diff(art.dir, art.lib, smollm_prompts(art.dir), decode_steps=4)
    assert diff < TOL, f"max |Δlogit| {diff:.2e}"


def test_prefill_after_history_matches_numpy(smollm_q4):
    """A second prefill on sequences that already hold KV (a long prompt's later chunks): the new tokens attend to the
    cached pages (the paged prefill kernel) and to themselves (the ragged one), states merged. One batch: a sequence
    with 40 tokens of history + 26 new, a fresh one, and one with 17 of history + 1 new."""
    tok = Tokenizer.from_file(str(smollm_q4.dir / "tokenizer.json"))
    long, short = tok.encode(LONG_TEXT).ids, smollm_prompts(smollm_q4.dir)[0]
    history = {0: long[:40], 2: long[:17]}
    new = {0: long[40:], 1: short, 2: long[17:18]}
    runner = ModelRunner(smollm_q4.dir, smollm_q4.lib)
    cache = runner.create_kv_cache(3, 256, 64)
    for s in range(3):
        runner.add_sequence(cache, s)
    runner.batch_prefill(cache, list(history), list(history.values()))
    logits = np.asarray(runner.batch_prefill(cache, list(new), list(new.values())))
    ref = reference_for(smollm_q4.dir)
    for row, s in zip(logits, new):
        expected = ref.logits(history.get(s, []) + new[s])[-1]
        assert np.abs(row - expected).max() < TOL, (s, np.abs(row - expected).max())


@pytest.mark.amx  # without AMX tiles the bf16 library compiles the float32 kernels
def test_bf16_prefill_library_stays_close_to_numpy(pipeline_dir, smollm_q4):
    """`snakemake build_smollm2_cpu` with device.prefill_precision=bf16 (lib/cpu-bf16.so in the same model folder,
    prefill GEMMs on bf16-rounded inputs): the float64 reference's greedy token, logits within BF16_TOL of it, and
    not the float32 library's logits (the option reached the kernels)."""
    r = run_snakemake(pipeline_dir, "build_smollm2_cpu", "--config", "deployment=smollm2_cpu",
                      "overrides=[device.prefill_precision=bf16]")
    assert r.returncode == 0, r.stderr[-4000:]
    lib = smollm_q4.dir / "lib" / "cpu-bf16.so"
    tok = Tokenizer.from_file(str(smollm_q4.dir / "tokenizer.json"))
    prompt = tok.encode(LONG_TEXT).ids
    expected = reference_for(smollm_q4.dir).logits(prompt)[-1]
    logits = []
    for path in (lib, smollm_q4.lib):
        runner = ModelRunner(smollm_q4.dir, path)
        cache = runner.create_kv_cache(1, 256, 128)
        runner.add_sequence(cache, 0)
        logits.append(np.asarray(runner.batch_prefill(cache, [0], [prompt]))[0])
    bf16, f32 = logits
    assert int(bf16.argmax()) == int(expected.argmax())
    assert np.abs(bf16 - expected).max() < BF16_TOL, np.abs(bf16 - expected).max()
    assert np.abs(bf16 - f32).max() > 10 * TOL, "the bf16 library gave the float32 library's logits"


def _greedy_steps(runners, caches, prompts, first, ref, steps=4):
    """Each runner's cache holds sequences 0.. = `prompts`, `first` their logits after the prompts (one [B, vocab]
    per runner): yields (step, the float64 reference's logits, the runners' logits) for those and for `steps`
    batch_decode steps, every runner fed the reference's greedy tokens."""
    seqs, logits, ids = [list(p) for p in prompts], first, list(range(len(prompts)))
    for step in range(steps + 1):
        expected = [ref.logits(seq)[-1] for seq in seqs]
        yield step, expected, logits
        if step == steps:
            return
        nxt = [int(exp.argmax()) for exp in expected]
        for seq, t in zip(seqs, nxt):
            seq.append(t)
        logits = [np.asarray(rn.batch_decode(cache, ids, nxt)) for rn, cache in zip(runners, caches)]


@pytest.mark.vnni
@pytest.mark.parametrize("prefill,lib", [("f32", "cpu-int8.so"), ("int8", "cpu-prefill-int8-int8.so")])
def test_int8_library_stays_close_to_numpy(pipeline_dir, smollm_q4, prefill, lib):
    """`snakemake build_smollm2_cpu` with device.decode_precision=int8 (and prefill_precision f32 or int8; the library
    beside cpu.so): the five prompts prefilled in one batch (with float32 prefill kernels, logits within TOL), then 4
    decode steps of the batch fed the float64 reference's greedy tokens: every step's logits within INT8_TOL of the
    reference on the same prefix, its greedy token the reference's unless the reference's two candidates are within
    2 * INT8_TOL (a near tie), and not the float32 library's logits (the option reached the kernels)."""
    r = run_snakemake(pipeline_dir, "build_smollm2_cpu", "--config", "deployment=smollm2_cpu",
                      f"overrides=[device.decode_precision=int8,device.prefill_precision={prefill}]")
    assert r.returncode == 0, r.stderr[-4000:]
    prompts = smollm_prompts(smollm_q4.dir)
    ref = reference_for(smollm_q4.dir)
    runners = [ModelRunner(smollm_q4.dir, path) for path in (smollm_q4.dir / "lib" / lib, smollm_q4.lib)]
    caches = [rn.create_kv_cache(len(prompts), 1024, 256) for rn in runners]
    ids = list(range(len(prompts)))
    for rn, cache in zip(runners, caches):
        for s in ids:
            rn.add_sequence(cache, s)
    first = [np.asarray(rn.batch_prefill(cache, ids, prompts)) for rn, cache in zip(runners, caches)]
    same, off_f32 = 0, 0.0
    for step, expected, (int8, f32) in _greedy_steps(runners, caches, prompts, first, ref):
        for i, exp in enumerate(expected):
            diff = float(np.abs(int8[i] - exp).max())
            assert diff < (TOL if step == 0 and prefill == "f32" else INT8_TOL), (step, i, diff)
            top, best = int(int8[i].argmax()), int(exp.argmax())
            assert top == best or exp[best] - exp[top] < 2 * INT8_TOL, (step, i, exp[best] - exp[top])
            same += top == best
            off_f32 = max(off_f32, float(np.abs(int8[i] - f32[i]).max()))
    assert same >= 0.9 * 5 * len(prompts), same
    assert off_f32 > 10 * TOL, "the int8 library gave the float32 library's logits"


def _kv16_library(pipeline_dir, smollm_q4):
    """`snakemake build_smollm2_cpu` with device.kv_cache_dtype=float16: lib/cpu-kv16.so beside cpu.so."""
    r = run_snakemake(pipeline_dir, "build_smollm2_cpu", "--config", "deployment=smollm2_cpu",
                      "overrides=[device.kv_cache_dtype=float16]")
    assert r.returncode == 0, r.stderr[-4000:]
    return smollm_q4.dir / "lib" / "cpu-kv16.so"


def test_float16_kv_cache_stays_close_to_numpy(pipeline_dir, smollm_q4):
    """The float16-cache library says so in its metadata (the engine sizes the cache at 2 bytes per value); a second
    prefill after history (ragged + paged prefill over float16 pages, states merged) and 4 decode steps over the five
    prompts: logits within KV16_TOL of the float64 reference on the same prefix, its greedy tokens, and not the
    float32-cache library's logits."""
    lib = _kv16_library(pipeline_dir, smollm_q4)
    runners = [ModelRunner(smollm_q4.dir, path) for path in (lib, smollm_q4.lib)]
    assert runners[0].metadata["kv_cache"]["dtype"] == "float16"
    assert runners[1].metadata["kv_cache"]["dtype"] == "float32"
    sizes = [resolve(EngineConfig(mode="server"), rn.metadata, "cpu", 8 * 2**30) for rn in runners]
    assert 2 * sizes[0].kv_bytes_per_token == sizes[1].kv_bytes_per_token
    prompts = smollm_prompts(smollm_q4.dir)
    history = {i: p[:len(p) // 2] for i, p in enumerate(prompts) if len(p) > 3}
    ref = reference_for(smollm_q4.dir)
    caches = [rn.create_kv_cache(len(prompts), 1024, 256) for rn in runners]
    ids = list(range(len(prompts)))
    for rn, cache in zip(runners, caches):
        for s in ids:
            rn.add_sequence(cache, s)
        rn.batch_prefill(cache, list(history), list(history.values()))
    rest = [p[len(history.get(i, [])):] for i, p in enumerate(prompts)]
    first = [np.asarray(rn.batch_prefill(cache, ids, rest)) for rn, cache in zip(runners, caches)]
    off_f32 = 0.0
    for step, expected, (kv16, f32) in _greedy_steps(runners, caches, prompts, first, ref):
        for i, exp in enumerate(expected):
            assert np.abs(kv16[i] - exp).max() < KV16_TOL, (step, i, np.abs(kv16[i] - exp).max())
            assert int(kv16[i].argmax()) == int(exp.argmax()), (step, i)
            off_f32 = max(off_f32, float(np.abs(kv16[i] - f32[i]).max()))
    assert off_f32 > TOL, "the float16 cache gave the float32 cache's logits"


def test_float16_kv_cache_through_the_engine(pipeline_dir, smollm_q4):
    """The engine's cache operations on float16 pages (TVM's page copy, pop and fork kernels in the cache's dtype):
    n-gram speculation (drafts verified, rejected ones popped), two choices per request (forked sequences) and a
    shared system prompt from the prefix cache give the float32-cache library's greedy text."""
    from mlc_llm import MLCEngine

    lib = _kv16_library(pipeline_dir, smollm_q4)
    system = "You are a helpful assistant. " * 20
    questions = ["List the numbers from 1 to 20 separated by commas.", "What is the capital of France?",
                 "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over it."]
    texts, cached = [], []
    for path in (lib, smollm_q4.lib):
        cfg = EngineConfig(mode="local", speculative_mode="ngram", spec_draft_length=4, prefix_cache_mode="radix")
        with MLCEngine(str(smollm_q4.dir), model_lib=str(path), device="cpu", engine_config=cfg) as engine:
            responses = [engine.chat.completions.create(
                messages=[{"role": "system", "content": system}, {"role": "user", "content": q}], temperature=0,
                max_tokens=32, n=2) for q in questions + questions]  # the second round: a cached prefix
            texts.append([[c.message.content for c in r.choices] for r in responses])
            cached.append([r.usage.prompt_tokens_details.cached_tokens for r in responses])
            metrics = engine.metrics()
            assert metrics["spec_draft_tokens"] > 0 and metrics["spec_accepted_tokens"] > 0, metrics
    assert texts[0] == texts[1]
    assert all(len(set(choices)) == 1 and choices[0] for choices in texts[0])
    assert min(cached[0][len(questions):]) > 100, cached


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1", "q4f32_cpu_f16scale"])  # q4f32_cpu: test_families.py (llama)
def test_tiny_llama31_from_hf_folder_matches_numpy(tmp_path, quant):
    """Untied lm_head, GQA, Llama-3.1 RoPE scaling, bf16 + f32 safetensors across two shards."""
    write_tiny_hf(tmp_path / "hf")
    out = tmp_path / f"tiny-{quant}"
    lib = build_with_steps(str(tmp_path / "hf"), quant, out)
    prompts = [[5, 17, 200, 3, 99, 12, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58], [7, 8, 9],
               [250, 1, 2, 3, 4, 5, 6]]
    diff = max_logit_diff(out, lib, prompts, decode_steps=5)
    assert diff < TOL, f"max |Δlogit| {diff:.2e}"


def test_rope_scaling_matters_in_the_reference(tmp_path):
    """Guards the test above: with these positions, ignoring Llama-3.1 scaling would change logits a lot."""
    write_tiny_hf(tmp_path / "hf")
    out = tmp_path / "tiny"
    from mlc_llm.steps.convert_weight import convert_weight
    from mlc_llm.steps.gen_config import gen_config

    gen_config(str(tmp_path / "hf"), "q0f32", "chatml", out)
    convert_weight(str(tmp_path / "hf"), "q0f32", out, progress=False)
    cfg = json.loads((out / "mlc-chat-config.json").read_text())["model_config"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    params = tensor_cache.load_numpy(out)
    tokens = list(range(3, 27))
    scaled = NumpyLlama(params, cfg).logits(tokens)
    plain = NumpyLlama(params, {**cfg, "rope_scaling": {}}).logits(tokens)
    assert np.abs(scaled - plain).max() > 50 * TOL
