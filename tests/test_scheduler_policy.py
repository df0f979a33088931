"""The scheduler without a model: policy.py's decisions on hand-made states, and EngineCore driven over a fake runner
(fixed next-token rule, real page accounting) through the paths a real model rarely reaches: preemption choices, a
request larger than the KV cache, a failing forward pass, shutdown while running, the sequence-count limit, n > 1
under preemption, the prefix cache under eviction, speculative drafts and their rollback."""
from __future__ import annotations

import numpy as np
import pytest

from mlc_llm.serve import policy
from mlc_llm.serve.config import ResolvedConfig
from mlc_llm.serve.draft import DraftPair
from mlc_llm.serve.prefix_cache import PrefixCache, RadixTree
from mlc_llm.serve.request import Done, Failed, GenerationConfig, Request
from mlc_llm.serve.sampler import SamplingParams
from mlc_llm.serve.scheduler import EngineCore
from mlc_llm.serve.speculative import ngram_propose

from .fake_runner import VOCAB, FakeRunner, FakeTokenizer, draft_next_token, greedy_reference, logits_after
from .helpers import chi2_pvalue


def config(**kw) -> ResolvedConfig:
    base = dict(mode="server", max_num_sequence=4, max_total_sequence_length=1024, max_single_sequence_length=512,
                prefill_chunk_size=256, page_size=16, kv_bytes_per_token=0, memory_budget_bytes=0,
                long_prefill_token_threshold=256, prefix_cache=True, prefix_cache_max_num_recycling_seqs=4)
    base.update(kw)
    return ResolvedConfig(**base)


class Sink:
    def __init__(self):
        self.events = []

    def __call__(self, ev):
        self.events.append(ev)

    @property
    def done(self):
        return any(isinstance(e, (Done, Failed)) for e in self.events)

    @property
    def failed(self):
        return next((e.error for e in self.events if isinstance(e, Failed)), None)


def request(prompt, max_tokens=8, n=1, temperature=0.0, seed=None, rid=None) -> Request:
    gen = GenerationConfig(SamplingParams(temperature=temperature), n=n, max_tokens=max_tokens, seed=seed)
    return Request(rid or f"r{id(prompt)}", list(prompt), gen, FakeTokenizer(), Sink())


def outputs(req: Request) -> list[list[int]]:
    return [s.tokens[s.num_prompt:] for s in sorted(req.seqs, key=lambda s: s.index)]


def run(core: EngineCore, reqs, max_steps=20000) -> None:
    for r in reqs:
        core.submit(r)
    for _ in range(max_steps):
        core.run_once()
        if not (core.waiting or core.running) and core.inbox.empty():
            return
    raise AssertionError("the engine did not go idle")


def assert_kv_accounted(core: EngineCore) -> None:
    """Nothing runs: every page is free or held by a cached sequence, and dropping the cache frees them all."""
    assert not core.running and not core.waiting
    kv = core.cache
    held = set(kv.seqs)
    cached = set(core.prefix_cache.recycled) if core.prefix_cache else set()
    assert held == cached, f"sequences left in the KV cache that nobody owns: {held - cached}"
    core.reset_prefix_cache()
    assert kv.free_pages() == len(kv.refs) and not kv.seqs


def prompt_of(seed: int, length: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, VOCAB, length)]


# ---- pure policy ------------------------------------------------------------------------------------------------
def test_radix_tree_match_insert_remove():
    t = RadixTree()
    t.insert(1, [1, 2, 3, 4, 5])
    t.insert(2, [1, 2, 3, 9])
    t.insert(3, [7, 8])
    assert t.match([1, 2, 3, 4, 5, 6]) == (5, {1})
    assert t.match([1, 2, 3, 9, 9]) == (4, {2})
    n, seqs = t.match([1, 2, 3, 7])
    assert n == 3 and seqs == {1, 2}
    assert t.match([5]) == (0, set())
    t.remove(1)
    assert t.match([1, 2, 3, 4, 5]) == (3, {2})
    t.remove(2)
    assert t.match([1, 2, 3]) == (0, set()) and t.match([7, 8, 9]) == (2, {3})
    t.insert(3, [7])  # re-indexing replaces the old tokens
    assert t.match([7, 8]) == (1, {3})
    t.remove(3)
    assert not t.root.children and len(t) == 0


def test_prefix_cache_prefers_recycled_and_evicts_lru():
    pc = PrefixCache(max_recycled=2)
    pc.index(10, [1, 2, 3, 4])  # running
    assert pc.recycle(11, [1, 2, 3, 4, 5]) == []
    assert pc.match([1, 2, 3, 4, 5, 6]) == (5, 11)
    assert pc.match([1, 2, 3, 9]) == (3, 11)  # both hold it; the recycled one is taken over
    assert pc.recycle(12, [6, 6]) == []
    assert pc.recycle(13, [7, 7]) == [11]  # over the limit: least recently used first
    assert pc.match([1, 2, 3, 4, 5]) == (4, 10)
    assert pc.evict(keep=12) == 13 and pc.evict() == 12 and pc.evict() is None


def test_admission_respects_slots_and_evicts_cached_before_refusing():
    cfg = config(max_num_sequence=2)
    running = [request(prompt_of(i, 20)) for i in range(2)]
    for i, r in enumerate(running):
        r.seqs[0].seq_id, r.seqs[0].kv_len, r.admitted_at = i, 20, i
    new = request(prompt_of(9, 20))
    st = policy.SchedulerState(cfg, [new], running, free_pages=100)
    assert policy.admission_action(st) is None  # no sequence slot left
    st = policy.SchedulerState(cfg, [new], running[:1], free_pages=2, recycled=[7, 8])
    assert policy.admission_action(st) == policy.Evict(7)  # pages short: the least recently used cached sequence
    st = policy.SchedulerState(cfg, [new], running[:1], free_pages=4)
    action = policy.admission_action(st)
    assert isinstance(action, policy.Admit) and action.reuse == [(new.seqs[0], 0, None)]
    # a cached prefix counts: fewer pages needed (1 + a decode page each, not 2 + 2) ...
    st = policy.SchedulerState(cfg, [new], running[:1], free_pages=3, recycled=[5], match=lambda tokens: (16, 5))
    action = policy.admission_action(st)
    assert isinstance(action, policy.Admit) and action.reuse[0][1:] == (16, 5)
    # ... and the source is never the one evicted
    st = policy.SchedulerState(cfg, [new], running[:1], free_pages=2, recycled=[5], match=lambda tokens: (16, 5))
    assert policy.admission_action(st) is None


def test_decode_evicts_then_preempts_newest_then_ends_a_lone_request():
    cfg = config()
    reqs = [request(prompt_of(i, 20)) for i in range(3)]
    for i, r in enumerate(reqs):
        s = r.seqs[0]
        s.seq_id, s.kv_len, r.admitted_at = i, 19, i  # prefilled, one token pending
    st = policy.SchedulerState(cfg, [], reqs, free_pages=2, recycled=[42], prefilled_last=True)
    assert policy.forward_action(st) == policy.Evict(42)
    st = policy.SchedulerState(cfg, [], reqs, free_pages=2, prefilled_last=True)
    assert policy.forward_action(st) == policy.Preempt(reqs[2])
    st = policy.SchedulerState(cfg, [], reqs[:1], free_pages=0, prefilled_last=True)
    assert isinstance(policy.forward_action(st), policy.EndLength)
    st = policy.SchedulerState(cfg, [], reqs, free_pages=3, prefilled_last=True)
    assert policy.forward_action(st) == policy.Decode([(r, r.seqs[0]) for r in reqs], [[], [], []])


def test_drafts_are_bounded_and_never_cost_pages_needed_elsewhere():
    cfg = config(spec_draft_length=5, speculative_mode="ngram")
    r = request(prompt_of(1, 20), max_tokens=3)
    s = r.seqs[0]
    s.seq_id, s.kv_len, r.admitted_at = 0, 19, 0
    propose = lambda seq, k: list(range(k))  # noqa: E731
    st = policy.SchedulerState(cfg, [], [r], free_pages=5, propose=propose, prefilled_last=True)
    assert policy.forward_action(st).drafts == [[0, 1]]  # max_tokens 3: the last token comes from the model
    r.gen.max_tokens = 100
    st = policy.SchedulerState(cfg, [], [r], free_pages=5, propose=propose, prefilled_last=True)
    assert policy.forward_action(st).drafts == [[0, 1, 2, 3, 4]]
    s.kv_len = 15  # the drafts would cross into a second new page: with one free page, none
    s.tokens = s.tokens[:16]
    st = policy.SchedulerState(cfg, [], [r], free_pages=1, propose=propose, prefilled_last=True)
    assert policy.forward_action(st).drafts == [[]]


def test_auto_speculation_drafts_only_when_measured_step_times_say_it_pays():
    cfg = config(spec_draft_length=4, speculative_mode="ngram", spec_adaptive=True)
    r = request(prompt_of(1, 20), max_tokens=100)
    s = r.seqs[0]
    s.seq_id, s.kv_len, r.admitted_at = 0, 19, 0
    propose = lambda seq, k: list(range(k))  # noqa: E731

    def state(costs):
        return policy.SchedulerState(cfg, [], [r], free_pages=50, propose=propose, prefilled_last=True,
                                     step_costs={(kind, 1, tokens): c for (kind, tokens), c in costs.items()})

    assert state({}).running and policy.forward_action(state({})).drafts == [[]]  # no decode timed yet
    # untimed verify steps are guessed at half a decode step per token: tried while acceptance is high
    assert policy.forward_action(state({("decode", 1): 1.0})).drafts != [[]]
    s.spec_accept = 0.9  # a verify of 5 tokens costing as much as a decode: all four drafts
    assert policy.forward_action(state({("decode", 1): 1.0, ("verify", 5): 1.0})).drafts == [[0, 1, 2, 3]]
    # verify steps measured 3x a decode step: 1 + .9 + .81 + .73 + .66 = 4.1 tokens for 3 -> still worth it
    slow = {("decode", 1): 1.0, **{("verify", t): 3.0 for t in range(2, 6)}}
    assert policy.forward_action(state(slow)).drafts == [[0, 1, 2, 3]]
    # ... but if 4 tokens cost as much as 2, three drafts (3.4 tokens) beat four (4.1 tokens for 1.5x the time)
    assert policy.forward_action(state({**slow, ("verify", 4): 2.0})).drafts == [[0, 1, 2]]
    s.spec_accept = 0.3  # 1 + .3 + .09 + ... < 1.5 tokens for 3x the time: no drafts
    assert policy.forward_action(state(slow)).drafts == [[]]
    assert policy.expected_tokens(0.5, 3) == 1.875
    # a verify step not measured is estimated from a measured one: 2 tokens at 3x -> 5 tokens at 3 * sqrt(5/2) = 4.7x
    s.spec_accept = 0.9
    assert policy.forward_action(state({("decode", 1): 1.0, ("verify", 2): 3.0})).drafts == [[]]
    assert policy.forward_action(state({("decode", 1): 1.0, ("verify", 2): 1.0})).drafts == [[0, 1, 2, 3]]


def test_prefill_takes_shortest_first_and_caps_long_prompts_while_others_wait():
    cfg = config(prefill_chunk_size=64, long_prefill_token_threshold=32)
    long, short = request(prompt_of(1, 100)), request(prompt_of(2, 10))
    for i, r in enumerate((long, short)):
        r.seqs[0].seq_id, r.admitted_at = i, i
    st = policy.SchedulerState(cfg, [], [long, short], free_pages=100)
    action = policy.forward_action(st)
    assert action == policy.Prefill([(short, short.seqs[0], 10)])  # the long one does not share its step
    st = policy.SchedulerState(cfg, [], [long], free_pages=100)
    assert policy.forward_action(st) == policy.Prefill([(long, long.seqs[0], 64)])  # alone: a whole chunk
    st = policy.SchedulerState(cfg, [short], [long], free_pages=100)
    assert policy.forward_action(st) == policy.Prefill([(long, long.seqs[0], 32)])  # others wait: capped


def test_ngram_proposer():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert ngram_propose([5, 6, 7, 8], 3) == []
    assert ngram_propose([4, 4], 3) == [4]
    assert ngram_propose([1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3], 2) == [5, 1]  # the latest occurrence


# ---- EngineCore over the fake runner ------------------------------------------------------------------------------
def test_outputs_match_the_model_with_and_without_prefix_cache_under_eviction_and_preemption():
    system = prompt_of(0, 40)
    prompts = [system + prompt_of(100 + i, 5 + 3 * i) for i in range(8)] + [prompt_of(7, 30)]
    expected = [greedy_reference(p, 24) for p in prompts]
    for prefix, total in ((False, 4096), (True, 4096), (True, 160), (False, 160)):
        core = EngineCore(FakeRunner(), config(prefix_cache=prefix, max_total_sequence_length=total))
        reqs = [request(p, max_tokens=24) for p in prompts]
        run(core, reqs[:3])  # some finish (and are cached) before the rest arrive
        run(core, reqs[3:])
        assert [outputs(r)[0] for r in reqs] == expected, (prefix, total)
        assert all(r.sink.failed is None for r in reqs)
        m = core.metrics()
        if prefix and total == 4096:
            assert m["prefix_cache_hit_tokens"] >= 5 * 40  # the later ones reused the shared system prompt
            assert sum(r.cached_tokens for r in reqs[3:8]) >= 5 * 40
        if total == 160:  # 10 pages for 4 sequences of ~60-90 tokens: requests waited and were preempted
            assert m["preemptions"] > 0 or m["prefix_cache_evictions"] > 0
        assert_kv_accounted(core)


def test_multi_turn_chat_reuses_the_previous_turn():
    core = EngineCore(FakeRunner(), config())
    history = prompt_of(3, 30)
    for turn in range(5):
        req = request(history, max_tokens=12)
        run(core, [req])
        out = outputs(req)[0]
        assert out == greedy_reference(history, 12)
        if turn:  # the previous turn's KV: its prompt and answer but the answer's last token (never fed back)
            assert req.cached_tokens == len(history) - 5 - 1
        history = history + out + prompt_of(50 + turn, 5)  # the next turn: this answer plus a new question
    assert core.metrics()["prefix_cache_sequences"] == 1  # each turn took over the previous one's sequence
    assert_kv_accounted(core)


def test_n_choices_survive_preemption_and_sampled_outputs_follow_the_seed():
    prompts = [prompt_of(20 + i, 25) for i in range(4)]
    results = []
    for total, prefix in ((4096, False), (192, False), (192, True)):
        core = EngineCore(FakeRunner(), config(max_total_sequence_length=total, prefix_cache=prefix))
        reqs = [request(p, max_tokens=20, n=3, temperature=1.0, seed=i) for i, p in enumerate(prompts)]
        run(core, reqs)
        assert all(r.sink.failed is None for r in reqs)
        if total == 192:  # 12 pages; a request's 3 choices take about 7
            assert core.metrics()["preemptions"] > 0
        results.append([outputs(r) for r in reqs])
        assert_kv_accounted(core)
    assert results[0] == results[1] == results[2]
    assert any(len({tuple(c) for c in choices}) > 1 for choices in results[0])  # choices really differ


def test_a_request_larger_than_the_kv_cache_ends_with_length_and_frees_everything():
    core = EngineCore(FakeRunner(), config(max_total_sequence_length=64, max_num_sequence=2))
    big = request(prompt_of(1, 40), max_tokens=200)
    run(core, [big])
    assert big.sink.failed is None and big.seqs[0].finish_reason == "length"
    assert 0 < big.seqs[0].num_generated < 200
    assert_kv_accounted(core)


def test_a_failing_forward_fails_its_requests_and_the_engine_goes_on():
    runner = FakeRunner(fail_on_forward=3)
    core = EngineCore(runner, config())
    first = [request(prompt_of(i, 20), max_tokens=10) for i in range(2)]
    run(core, first)
    assert all("injected" in str(r.sink.failed) for r in first)
    after = request(prompt_of(5, 20), max_tokens=10)
    run(core, [after])
    assert after.sink.failed is None and outputs(after)[0] == greedy_reference(after.prompt, 10)
    assert_kv_accounted(core)


def test_shutdown_with_requests_running_ends_them_and_frees_the_kv():
    core = EngineCore(FakeRunner(), config())
    done = request(prompt_of(1, 20), max_tokens=4)
    run(core, [done])  # cached now
    reqs = [request(prompt_of(i, 20), max_tokens=100) for i in range(6)]
    for r in reqs:
        core.submit(r)
    for _ in range(5):
        core.run_once()
    assert core.running and core.waiting
    core.stop()
    assert core.run_once() is False
    assert all("terminated" in str(r.sink.failed) for r in reqs)
    assert not core.cache.seqs and core.cache.free_pages() == len(core.cache.refs)


def test_the_sequence_count_limit_holds():
    runner = FakeRunner()
    core = EngineCore(runner, config(max_num_sequence=2))
    reqs = [request(prompt_of(i, 10), max_tokens=6, n=1 + i % 2) for i in range(5)]
    for r in reqs:
        core.submit(r)
    peak = 0
    while True:
        core.run_once()
        peak = max(peak, sum(not s.finished and s.seq_id is not None for r in core.running for s in r.seqs))
        if not (core.running or core.waiting):
            break
    assert peak == 2
    assert all(r.sink.failed is None and len(outputs(r)) == r.gen.n for r in reqs)
    assert_kv_accounted(core)


@pytest.mark.parametrize("prefix", [False, True])
def test_speculation_is_token_identical_and_rolls_back_rejected_drafts(prefix):
    # repetitive prompts make the n-gram proposer draft often; the fake model rejects many drafts
    prompts = [(prompt_of(i, 6) * 6)[:30] for i in range(6)]
    expected = [greedy_reference(p, 40) for p in prompts]
    runner = FakeRunner()
    core = EngineCore(runner, config(speculative_mode="ngram", spec_draft_length=4, prefix_cache=prefix))
    reqs = [request(p, max_tokens=40) for p in prompts]
    run(core, reqs)
    assert [outputs(r)[0] for r in reqs] == expected
    m = core.metrics()
    assert m["spec_draft_tokens"] > 0 and any(name == "verify" for name, _ in runner.calls)
    assert 0 <= m["spec_accepted_tokens"] < m["spec_draft_tokens"]  # some rejected: rollback exercised
    assert_kv_accounted(core)


def test_speculative_sampling_follows_the_target_distribution():
    """The first two sampled tokens, the second always verified against an n-gram draft (the prompt holds every
    token, so any first token has an earlier occurrence): their joint frequencies against the fake model's own
    distribution p(t1) p(t2 | t1), chi-square."""
    def probs(history):
        p = np.exp(logits_after(history).astype(np.float64))
        return p / p.sum()

    prompt = list(range(VOCAB)) + [5, 6]
    p1 = probs(prompt)
    joint = np.stack([p1[a] * probs(prompt + [a]) for a in range(VOCAB)])
    trials = 2000
    core = EngineCore(FakeRunner(), config(speculative_mode="ngram", spec_draft_length=3, prefix_cache=False,
                                           max_num_sequence=16))
    # max_tokens 3: the second token is verified against a one-token draft (the third comes from the model)
    reqs = [request(prompt, max_tokens=3, temperature=1.0, seed=i) for i in range(trials)]
    for i in range(0, trials, 16):
        run(core, reqs[i:i + 16])
    counts = np.zeros_like(joint)
    for r in reqs:
        a, b = outputs(r)[0][:2]
        counts[a, b] += 1
    assert core.metrics()["spec_verify_rows"] == trials
    keep = joint * trials >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(joint[keep], joint[~keep].sum()) * trials
    assert keep.sum() >= 10
    assert chi2_pvalue(observed, expected) > 1e-3
    # a rule that always took the draft would fail this test: check that the test sees the difference
    drafted = np.array([ngram_propose(prompt + [a], 1)[0] for a in range(VOCAB)])
    biased = np.zeros_like(joint)
    biased[np.arange(VOCAB), drafted] = p1 * trials
    assert chi2_pvalue(np.append(biased[keep], biased[~keep].sum()), expected) < 1e-6


# ---- speculation with a draft model (DraftPair over two fake runners) --------------------------------------------
def check_draft_kv(pair: DraftPair, cache) -> None:
    """The target's KV holds exactly what the pair says, the draft's a prefix of it."""
    for seq_id, content in pair.content.items():
        assert cache[0].seqs[seq_id]["tokens"] == content
        assert cache[1].seqs[seq_id]["tokens"] == content[:pair.draft_len[seq_id]]
    assert set(cache[0].seqs) == set(cache[1].seqs) == set(pair.content)


@pytest.mark.parametrize("total, prefix, n", [(4096, True, 1), (192, True, 1), (192, False, 2), (4096, False, 3)])
def test_small_draft_is_token_identical_and_keeps_both_caches_in_step(total, prefix, n):
    pair = DraftPair(FakeRunner(), FakeRunner(rule=draft_next_token))
    core = EngineCore(pair, config(speculative_mode="small_draft", spec_draft_length=4, prefix_cache=prefix,
                                   max_total_sequence_length=total))
    system = prompt_of(0, 20)
    reqs = [request(system + prompt_of(10 + i, 8 + i), max_tokens=30, n=n) for i in range(6)]
    for r in reqs:
        core.submit(r)
    while True:
        core.run_once()
        check_draft_kv(pair, core.cache)
        if not (core.running or core.waiting):
            break
    for r in reqs:
        assert r.sink.failed is None
        assert outputs(r) == [greedy_reference(r.prompt, 30)] * n
    m = core.metrics()
    assert 0 < m["spec_accepted_tokens"] < m["spec_draft_tokens"]  # the draft is right often, not always
    if total == 192:
        assert m["preemptions"] > 0 or m["prefix_cache_evictions"] > 0
    core.reset_prefix_cache()
    assert not core.cache[0].seqs and not core.cache[1].seqs
    assert core.cache[0].free_pages() == len(core.cache[0].refs) == core.cache[1].free_pages()


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused(tmp_path):
    class Other(FakeRunner):
        vocab_size = VOCAB + 1

    with pytest.raises(ValueError, match="vocabulary of 98 tokens, the model 97"):
        DraftPair(FakeRunner(), Other())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "tokenizer.json").write_text('{"model": 1}')
    (tmp_path / "b" / "tokenizer.json").write_text('{"model": 2}')
    with pytest.raises(ValueError, match="different tokenizer"):
        DraftPair(FakeRunner(model_dir=tmp_path / "a"), FakeRunner(model_dir=tmp_path / "b"))
