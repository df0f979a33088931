"""How the engine shares itself between requests (real SmolLM2): a long prompt does not hold up a short request or the
running streams, and a request with many choices does not lock everyone else out. Assertions are on the order of
events, never on wall-clock times."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mlc_llm import MLCEngine


def _wait(cond, timeout=120.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def engine(smollm_q4):
    e = MLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), mode="local",
                  overrides="max_num_sequence=4;max_total_seq_length=8192")
    yield e
    e.terminate()


def test_a_short_request_and_a_stream_are_served_between_the_chunks_of_a_long_prompt(engine):
    assert engine.config.long_prefill_token_threshold == 512
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(1000, 20000, size=6000)]
    log: list[tuple[str, float]] = []
    stream_tokens = []

    def stream():
        for chunk in engine.completions.create(prompt="Once upon a time", max_tokens=40, temperature=0,
                                               ignore_eos=True, stream=True):
            if chunk.choices and chunk.choices[0].text:
                stream_tokens.append(time.perf_counter())
        log.append(("stream done", time.perf_counter()))

    def long():
        engine.completions.create(prompt=long_prompt, max_tokens=1, temperature=0)
        log.append(("long done", time.perf_counter()))

    threads = [threading.Thread(target=stream)]
    threads[0].start()
    _wait(lambda: len(stream_tokens) >= 2)
    steps = engine.metrics()["prefill_steps"]
    threads.append(threading.Thread(target=long))
    threads[1].start()
    _wait(lambda: engine.metrics()["prefill_steps"] >= steps + 2)  # the long prompt's chunks are under way
    short = engine.completions.create(prompt="The capital of France is", max_tokens=4, temperature=0)
    log.append(("short done", time.perf_counter()))
    for t in threads:
        t.join()
    order = [name for name, _ in sorted(log, key=lambda e: e[1])]
    assert order.index("short done") < order.index("long done"), order
    long_done = dict(log)["long done"]
    during = [t for t in stream_tokens if t < long_done]
    assert len(during) >= 8, len(during)  # the stream kept decoding between the long prompt's chunks
    assert short.choices[0].text.strip()
    engine.reset_prefix_cache()
    m = engine.metrics()
    assert m["num_running"] == 0 and m["kv_pages_free"] == m["kv_pages_total"]


def test_many_choices_run_in_waves_and_leave_room_for_others(engine):
    alone = engine.completions.create(prompt="My favourite food is", max_tokens=12, temperature=0)
    assert engine.config.max_num_sequence == 4
    big_kw = dict(prompt="My favourite food is", max_tokens=12, temperature=0, n=9)  # more choices than slots
    done: dict[str, object] = {}

    def big():
        done["big"] = engine.completions.create(**big_kw)
        done["big at"] = time.perf_counter()

    t = threading.Thread(target=big)
    t.start()
    _wait(lambda: engine.metrics()["decode_steps"] > 0 and engine.metrics()["num_running"] >= 1)
    normal = engine.completions.create(prompt="The sky is", max_tokens=3, temperature=0)
    normal_at = time.perf_counter()
    t.join()
    assert normal_at < done["big at"]  # not held until every choice of the big request was done
    choices = done["big"].choices
    assert [c.index for c in choices] == list(range(9))
    assert all(c.text == alone.choices[0].text for c in choices)  # greedy: every wave gives the same answer
    assert normal.choices[0].text.strip()
    engine.reset_prefix_cache()
    m = engine.metrics()
    assert m["num_running"] == 0 and m["kv_pages_free"] == m["kv_pages_total"]


def test_sampled_choices_in_waves_are_reproducible_with_a_seed(engine):
    kw = dict(prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7, n=6)
    a = [c.text for c in engine.completions.create(**kw).choices]
    b = [c.text for c in engine.completions.create(**kw).choices]
    assert a == b and len(set(a)) > 1
