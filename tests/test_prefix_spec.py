"""Prefix caching and n-gram speculative decoding on the real SmolLM2 (built by the pipeline): outputs are those of the
plain engine (greedy token-identical), the cache is used (cached_tokens, hit rate), the KV is accounted for after
tiny-budget runs, and bad speculative settings fail before the engine starts."""
from __future__ import annotations

import concurrent.futures as cf

import pytest

from mlc_llm import MLCEngine
from mlc_llm.serve.config import EngineConfig

TOPICS = ["the ocean", "a red fox", "Paris in spring", "prime numbers", "a rainy day", "the moon landing",
          "coffee", "a lost key", "mountains", "a robot cook", "the library", "winter birds", "a small boat",
          "old maps", "a violin", "green tea", "the desert", "a city bus", "sunflowers", "a snowman"]
# repetitive tasks (the output copies the input), where n-gram drafts are accepted, mixed with free ones
PROMPTS = [f"Repeat this list exactly: {t}, {t}, {t}, apples, pears, plums, {t}." if i % 2 else
           f"Write two sentences about {t}." for i, t in enumerate(TOPICS)]


def make(smollm_q4, **kw) -> MLCEngine:
    overrides = kw.pop("overrides", "max_num_sequence=8;max_total_seq_length=8192")
    return MLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), mode="server", overrides=overrides,
                     engine_config=EngineConfig(mode="server", **kw))


@pytest.fixture(scope="module")
def plain(smollm_q4):
    e = make(smollm_q4, prefix_cache_mode="disable")
    yield e
    e.terminate()


@pytest.fixture(scope="module")
def spec(smollm_q4):
    e = make(smollm_q4, speculative_mode="ngram", spec_draft_length=4)
    yield e
    e.terminate()


def chat(engine, messages, **kw):
    return engine.chat.completions.create(messages=messages, temperature=0, **kw)


def concurrently(fn, items, workers=8):
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def assert_kv_free(engine) -> None:
    engine.reset_prefix_cache()
    m = engine.metrics()
    assert m["num_running"] == 0 and m["kv_pages_free"] == m["kv_pages_total"], m


# ---- prefix cache -------------------------------------------------------------------------------------------------
def five_turns(engine) -> tuple[list[str], list[int]]:
    messages, answers, cached = [{"role": "system", "content": "You are a terse assistant."}], [], []
    for q in ["Name a colour.", "Name an animal of that colour.", "Where does it live?", "What does it eat?",
              "Give it a name."]:
        messages.append({"role": "user", "content": q})
        r = chat(engine, messages, max_tokens=24)
        answers.append(r.choices[0].message.content)
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers, cached


def test_a_five_turn_chat_is_the_same_with_the_cache_and_reuses_each_turn(smollm_q4, plain):
    expected, none_cached = five_turns(plain)
    assert none_cached == [0] * 5
    cached_engine = make(smollm_q4)
    try:
        answers, cached = five_turns(cached_engine)
        assert answers == expected
        assert cached[0] == 0 and all(c > 10 for c in cached[1:]), cached  # each turn reuses the previous one's KV
        assert cached_engine.metrics()["prefix_cache_hit_rate"] > 0.5
        assert_kv_free(cached_engine)
    finally:
        cached_engine.terminate()


SYSTEM = "You answer questions about a fictional town. " + " ".join(
    f"Fact {i}: the house at number {i} is painted {c}." for i, c in
    zip(range(1, 66), ["red", "blue", "green", "white", "yellow"] * 13))


def shared_prefix_requests(engine) -> list[tuple[str, int]]:
    def one(i):
        r = chat(engine, [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"What colour is the house at number {i * 7 + 1}?"}],
                 max_tokens=16)
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens

    return concurrently(one, range(8))


def test_eight_concurrent_requests_sharing_a_1000_token_system_prompt(smollm_q4, plain):
    expected = [a for a, _ in shared_prefix_requests(plain)]
    prompt_tokens = chat(plain, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}],
                         max_tokens=1).usage.prompt_tokens
    assert prompt_tokens > 1000
    cached_engine = make(smollm_q4)
    try:
        first = shared_prefix_requests(cached_engine)
        assert [a for a, _ in first] == expected
        again = shared_prefix_requests(cached_engine)  # the system prompt is cached now
        assert [a for a, _ in again] == expected
        assert all(c > 1000 for _, c in again), again
        assert_kv_free(cached_engine)
    finally:
        cached_engine.terminate()


def test_a_tiny_kv_budget_forces_eviction_and_preemption_with_the_same_outputs(smollm_q4, plain):
    prompts = [f"Tell me about {t}." for t in TOPICS[:8]]
    expected = concurrently(lambda p: chat(plain, [{"role": "user", "content": p}], max_tokens=40)
                            .choices[0].message.content, prompts)
    small = make(smollm_q4, overrides="max_num_sequence=4;max_total_seq_length=256;prefill_chunk_size=256")
    try:
        def one(p):
            return chat(small, [{"role": "user", "content": p}], max_tokens=40).choices[0].message.content

        got = concurrently(one, prompts)
        got_again = concurrently(one, prompts)
        assert got == expected and got_again == expected
        # a prompt sharing only the template's system prompt with the cached sequences and needing more pages than
        # are free: cached sequences must be evicted (whatever the order the concurrent requests ran in above)
        long = " ".join(f"item{i}" for i in range(60))
        answer = chat(small, [{"role": "user", "content": long}], max_tokens=8)
        assert 120 < answer.usage.prompt_tokens < 240, answer.usage
        assert answer.choices[0].message.content == chat(plain, [{"role": "user", "content": long}],
                                                         max_tokens=8).choices[0].message.content
        m = small.metrics()
        assert m["preemptions"] > 0 and m["prefix_cache_evictions"] > 0, m
        assert m["prefix_cache_hit_tokens"] > 0
        assert_kv_free(small)
    finally:
        small.terminate()


def test_grammar_constrained_requests_survive_preemption(smollm_q4, plain):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"topic": {"type": "string"}, "facts": {"type": "array", "items": {
            "type": "string"}}}, "required": ["topic", "facts"]}}}

    def ask(engine, topic):
        return chat(engine, [{"role": "user", "content": f"Three facts about {topic}, as JSON."}], max_tokens=48,
                    response_format=fmt, n=2).choices

    expected = [[c.message.content for c in ask(plain, t)] for t in TOPICS[:6]]
    small = make(smollm_q4, overrides="max_num_sequence=4;max_total_seq_length=256;prefill_chunk_size=256")
    try:
        got = concurrently(lambda t: [c.message.content for c in ask(small, t)], TOPICS[:6])
        assert got == expected
        assert small.metrics()["preemptions"] > 0
        assert_kv_free(small)
    finally:
        small.terminate()


def test_grammar_and_n_choices_share_the_cache(smollm_q4):
    e = make(smollm_q4)
    try:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Give a JSON object."}]
        fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}}}
        a = chat(e, messages, max_tokens=30, response_format=fmt)
        b = chat(e, messages, max_tokens=30, response_format=fmt, n=3)
        assert b.usage.prompt_tokens_details.cached_tokens > 1000
        assert [c.message.content for c in b.choices] == [a.choices[0].message.content] * 3
        assert_kv_free(e)
    finally:
        e.terminate()


# ---- speculative decoding (n-gram) --------------------------------------------------------------------------------
def completion(engine, prompt, **kw):
    kw.setdefault("max_tokens", 48)
    kw.setdefault("temperature", 0)
    return engine.completions.create(prompt=prompt, **kw)


def test_ngram_greedy_output_is_token_identical_alone_and_batched(plain, spec):
    before = spec.metrics()
    expected = [completion(plain, p).choices[0].text for p in PROMPTS]
    alone = [completion(spec, p).choices[0].text for p in PROMPTS]
    batched = concurrently(lambda p: completion(spec, p).choices[0].text, PROMPTS)
    assert alone == expected
    assert batched == expected
    m = spec.metrics()
    accepted = m["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert m["spec_draft_tokens"] > before["spec_draft_tokens"] and accepted > 0
    assert m["spec_accept_len"] > 1


def test_ngram_keeps_streaming_seeds_logprobs_and_stop_strings(plain, spec):
    prompt = PROMPTS[1]
    seeded = [completion(spec, prompt, temperature=0.8, seed=7).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    a = completion(plain, prompt, logprobs=2)
    b = completion(spec, prompt, logprobs=2)
    assert b.choices[0].logprobs.tokens == a.choices[0].logprobs.tokens
    assert b.choices[0].logprobs.token_logprobs == pytest.approx(a.choices[0].logprobs.token_logprobs, abs=1e-3)
    streamed = "".join(c.choices[0].text for c in completion(spec, prompt, stream=True) if c.choices)
    assert streamed == a.choices[0].text
    stop = a.choices[0].text.split()[3]
    sa, sb = completion(plain, prompt, stop=[stop]), completion(spec, prompt, stop=[stop])
    assert sb.choices[0].text == sa.choices[0].text and sb.choices[0].finish_reason == "stop"
    assert_kv_free(spec)


def test_ngram_with_a_grammar(plain, spec):
    fmt = {"type": "json_schema", "json_schema": {"name": "l", "schema": {
        "type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
        "required": ["items"]}}}
    messages = [{"role": "user", "content": PROMPTS[3] + " Answer in JSON."}]
    a = chat(plain, messages, max_tokens=60, response_format=fmt)
    b = chat(spec, messages, max_tokens=60, response_format=fmt)
    assert b.choices[0].message.content == a.choices[0].message.content


@pytest.mark.parametrize("kwargs, message", [
    ({"speculative_mode": "eagle"}, "unknown speculative_mode 'eagle'"),
    ({"speculative_mode": "ngram", "spec_draft_length": -1}, "spec_draft_length must be an integer in [0, 16]"),
    ({"speculative_mode": "ngram", "spec_draft_length": 17}, "spec_draft_length must be an integer in [0, 16]"),
    ({"speculative_mode": "small_draft"}, "'small_draft' needs one draft model"),
    ({"speculative_mode": "ngram", "additional_models": ["x"]}, "draft models for speculative_mode 'small_draft'"),
    ({"prefix_cache_mode": "lru"}, "unknown prefix_cache_mode 'lru'"),
    ({"prefix_cache_max_num_recycling_seqs": -2}, "prefix_cache_max_num_recycling_seqs must be an integer >= -1"),
])
def test_bad_speculative_and_prefix_settings_fail_before_the_engine_starts(kwargs, message):
    with pytest.raises(ValueError) as e:
        EngineConfig(**kwargs)
    assert message in str(e.value)


def test_speculative_sampling_follows_the_model_distribution_on_a_tiny_compiled_model(tmp_path):
    """A tiny random-weight Llama, compiled, drafting for itself (small_draft: the draft is its argmax, verified on
    every step): the joint frequencies of the first two sampled tokens (top_k 4, so 16 outcomes) over 1,500 seeded
    requests against p(t1) p(t2 | t1) from the numpy reference on the same weights, chi-square."""
    import numpy as np

    from .helpers import build_with_steps, chi2_pvalue, reference_for
    from .tiny_hf import write_tiny_hf

    write_tiny_hf(tmp_path / "hf")
    out = tmp_path / "tiny"
    lib = build_with_steps(str(tmp_path / "hf"), "q0f32", out)
    ref = reference_for(out)
    prompt, k = [5, 17, 200, 3, 99, 12, 44, 45], 4

    def top_k_probs(logits):
        keep = np.argsort(-logits)[:k]
        p = np.exp(logits[keep] - logits[keep].max())
        return dict(zip(keep.tolist(), (p / p.sum()).tolist()))

    first = top_k_probs(ref.logits(prompt)[-1].astype(np.float64))
    joint = {(a, b): pa * pb for a, pa in first.items()
             for b, pb in top_k_probs(ref.logits(prompt + [a])[-1].astype(np.float64)).items()}
    engine = MLCEngine(str(out), model_lib=str(lib), mode="server", overrides="max_num_sequence=8",
                       engine_config=EngineConfig(mode="server", prefix_cache_mode="disable",
                                                  speculative_mode="small_draft", spec_draft_length=2,
                                                  additional_models=[f"{out},{lib}"]))
    trials = 1500
    try:
        # straight to the engine core, to read token ids (byte tokens of the random tokenizer all print as U+FFFD)
        import threading

        from mlc_llm.serve.request import Done, GenerationConfig, Request
        from mlc_llm.serve.sampler import SamplingParams

        reqs, done = [], threading.Semaphore(0)
        for seed in range(trials):
            gen = GenerationConfig(SamplingParams(temperature=1.0, top_k=k), max_tokens=3, ignore_eos=True,
                                   seed=seed)
            reqs.append(Request(f"r{seed}", list(prompt), gen, engine.tokenizer,
                                lambda ev: done.release() if isinstance(ev, Done) else None))
            engine.core.submit(reqs[-1])
        for _ in range(trials):
            assert done.acquire(timeout=300)
        m = engine.metrics()
    finally:
        engine.terminate()
    assert m["spec_verify_rows"] >= trials  # every second token was verified against a draft
    assert 0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"]
    counts: dict = {}
    for r in reqs:
        key = tuple(r.seqs[0].tokens[len(prompt):len(prompt) + 2])
        counts[key] = counts.get(key, 0) + 1
    assert sum(counts.get(key, 0) for key in joint) == trials  # every pair is one of the 16 outcomes
    observed = np.array([counts.get(key, 0) for key in joint], float)
    expected = np.array(list(joint.values())) * trials
    assert chi2_pvalue(observed, expected) > 1e-3, (observed, expected)
