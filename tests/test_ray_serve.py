"""`mlc_llm serve --backend ray`: a real local Ray cluster (started by the server process), 2 engine replicas x 1
thread of the real SmolLM2, behind Ray Serve's proxy."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import sys
import time

import pytest
import requests

from .server_utils import ServerProcess, free_port, scrape

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def ray_server(smollm_q4, tmp_path_factory):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("2 replicas x 1 thread need 2 CPUs")
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "server.log"
    cmd = ["env", "TVM_NUM_THREADS=1", sys.executable, "-m", "mlc_llm", "serve", str(smollm_q4.dir), "--model-lib",
           str(smollm_q4.lib), "--backend", "ray", "--replicas", "2", "--port", str(port)]
    server = ServerProcess([], port, log, cmd=cmd)
    try:
        server.wait_health(timeout=300)
        wait_replicas(server, 2)
        yield server
    finally:
        code = server.stop(timeout=60)
        assert code == 0, server.log()[-3000:]


def health(server) -> dict:
    return requests.get(server.url + "/health", timeout=10).json()


def wait_replicas(server, n: int, without: str | None = None, timeout: float = 180) -> list[dict]:
    """The replica reports once `n` replicas report (none of them `without`)."""
    deadline = time.time() + timeout
    while True:
        replicas = health(server).get("replicas", [])
        if len(replicas) == n and all(r["replica"] != without for r in replicas):
            return replicas
        assert time.time() < deadline, replicas
        time.sleep(0.5)


def served(server) -> dict[str, int]:
    """Requests each replica started, from reports made after this call (reports come every second)."""
    since = time.time()
    while True:
        replicas = health(server)["replicas"]
        if all(time.time() - r["seconds_since_report"] > since for r in replicas):
            return {r["replica"]: r["requests"] for r in replicas}
        time.sleep(0.2)


def wait_served(server, before: dict[str, int], total: int, timeout: float = 30) -> dict[str, int]:
    """Per-replica request counts once `total` more requests than `before` were reported (reports come every
    second); returns the increase per replica."""
    deadline = time.time() + timeout
    while True:
        now = served(server)
        delta = {k: v - before.get(k, 0) for k, v in now.items()}
        if sum(delta.values()) >= total:
            return {k: v for k, v in delta.items() if v}
        assert time.time() < deadline, (before, now)
        time.sleep(0.2)


def wait_idle(server, timeout: float = 60) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        replicas = health(server)["replicas"]
        if all(r["num_running"] == 0 and r["num_waiting"] == 0 for r in replicas):
            return replicas
        assert time.time() < deadline, replicas
        time.sleep(0.2)


def chat(server, messages, max_tokens=24, **extra):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens,
                                                                 "temperature": 0, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_32_concurrent_requests_all_succeed_on_both_replicas(ray_server):
    before = served(ray_server)
    prompts = [f"Tell me one fact about the number {i}." for i in range(32)]
    with cf.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda p: chat(ray_server, [{"role": "user", "content": p}]), prompts))
    assert all(a["choices"][0]["message"]["content"] for a in answers)
    delta = wait_served(ray_server, before, 32)
    assert len(delta) == 2 and sum(delta.values()) == 32, delta
    # the same answers as one engine gives (greedy): the replicas are the same model
    solo = chat(ray_server, [{"role": "user", "content": prompts[5]}])
    assert solo["choices"][0]["message"]["content"] == answers[5]["choices"][0]["message"]["content"]
    # per-replica series on /metrics, one family each (Prometheus refuses a family declared twice)
    text = requests.get(ray_server.url + "/metrics", timeout=10).text
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types)), [t for t in types if types.count(t) > 1]
    m = scrape(ray_server.url)
    by_replica = {k: v for k, v in m.items() if k.startswith("mlc_llm:prompt_tokens_total{") and "replica=" in k}
    assert len(by_replica) == 2 and all(v > 0 for v in by_replica.values()), by_replica


def test_turns_of_one_chat_go_to_the_same_replica(ray_server):
    """Four chats of three turns, one request at a time: every turn of a chat on the replica of its first turn, and
    turns 2-3 find the previous turns' KV in that replica's prefix cache."""
    for c in range(4):
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"My name is User{c}. Which planet is the largest?"}]
        replicas = []
        for turn in range(3):
            before = served(ray_server)
            answer = chat(ray_server, messages, max_tokens=16)
            (replica,) = wait_served(ray_server, before, 1)
            replicas.append(replica)
            if turn:
                cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert cached > answer["usage"]["prompt_tokens"] // 2, (turn, answer["usage"])
            messages += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                         {"role": "user", "content": f"And the smallest? (turn {turn + 2})"}]
        assert len(set(replicas)) == 1, (c, replicas)


def test_client_abort_frees_kv_on_the_replica_that_ran_it(ray_server):
    wait_idle(ray_server)
    r = requests.post(ray_server.url + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200, r.text
    assert all(x["kv_pages_used"] == 0 for x in health(ray_server)["replicas"])
    body = {"messages": [{"role": "user", "content": "Write a very long story about a dragon and a knight."}],
            "max_tokens": 2000, "temperature": 0, "stream": True}
    stream = requests.post(ray_server.url + "/v1/chat/completions", json=body, stream=True, timeout=60)
    lines = stream.iter_lines()
    chunks = 0
    while chunks < 5:
        if next(lines).startswith(b"data: {"):
            chunks += 1
    deadline = time.time() + 10
    while not (running := [x for x in health(ray_server)["replicas"] if x["num_running"]]):
        assert time.time() < deadline
        time.sleep(0.2)
    (runner,) = running
    assert runner["kv_pages_used"] > 0
    stream.close()
    replicas = {x["replica"]: x for x in wait_idle(ray_server, timeout=30)}
    assert replicas[runner["replica"]]["num_running"] == 0
    # its KV is held only as a cached prefix now: dropping the cache frees every page, on both replicas
    r = requests.post(ray_server.url + "/reset_prefix_cache", timeout=60)
    assert r.status_code == 200, r.text
    after = {x["replica"]: x for x in health(ray_server)["replicas"]}
    assert after[runner["replica"]]["kv_pages_used"] == 0 and after[runner["replica"]]["prefix_cache_sequences"] == 0
    m = scrape(ray_server.url)
    assert any("finished_reason=\"abort\"" in k and f'replica="{runner["replica"]}"' in k for k in m), \
        [k for k in m if "request_success_total{" in k]


def test_errors_keep_the_openai_shape_through_the_replicas(ray_server):
    r = requests.post(ray_server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = requests.post(ray_server.url + "/v1/completions", json={"prompt": "x", "stream": True,
                                                                 "max_tokens": 100000}, timeout=60)
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"], r.text
    r = requests.get(ray_server.url + "/v1/models", timeout=10)
    assert r.status_code == 200 and r.json()["data"][0]["max_model_len"] > 0


def _request(server, i: int, stream: bool):
    body = {"messages": [{"role": "user", "content": f"Write a long story about the number {i}."}],
            "max_tokens": 100, "temperature": 0, "stream": stream}
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=180, stream=stream)
    if not stream:
        return r.status_code, r.json()
    events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    return r.status_code, events


def test_a_killed_replica_fails_cleanly_and_comes_back(ray_server):
    """Last in this module: it replaces a replica. 16 requests (half streamed) on both replicas; one replica's process
    is killed while it runs some. Non-streamed requests it held are retried on the other one; a stream it was
    sending ends with an OpenAI-shaped error event and [DONE]; new requests succeed; Ray starts a new replica."""
    wait_idle(ray_server)
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(_request, ray_server, i, i % 2 == 0) for i in range(16)]
        deadline = time.time() + 60
        while not (busy := [x for x in health(ray_server)["replicas"] if x["num_running"] >= 2]):
            assert time.time() < deadline
            time.sleep(0.2)
        victim = busy[0]
        os.kill(victim["pid"], signal.SIGKILL)
        results = [f.result() for f in futures]
    failed_streams = 0
    for i, (status, payload) in enumerate(results):
        assert status == 200, (i, payload)
        if i % 2:  # not streamed: retried elsewhere when its replica died
            assert payload["choices"][0]["message"]["content"], payload
            continue
        assert payload[-1] == b"[DONE]", payload[-3:]
        errors = [json.loads(e) for e in payload[:-1] if b'"error"' in e]
        if errors:
            failed_streams += 1
            assert errors[0]["error"]["code"] == "replica_unavailable", errors
            assert len(errors) == 1 and json.loads(payload[-2]) == errors[0], payload[-3:]
        else:
            assert json.loads(payload[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert failed_streams <= 8
    # new requests keep succeeding while the replica is replaced, and after
    for i in range(4):
        assert chat(ray_server, [{"role": "user", "content": f"Say hello {i}."}], max_tokens=8)["choices"]
    replicas = wait_replicas(ray_server, 2, without=victim["replica"])
    assert victim["pid"] not in [r["pid"] for r in replicas]
    before = served(ray_server)
    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: chat(ray_server, [{"role": "user", "content": f"Count to {i}."}], max_tokens=8),
                      range(8)))
    assert sum(wait_served(ray_server, before, 8).values()) == 8


def test_prefix_keys_and_the_preferred_replica():
    from collections import namedtuple
    from types import SimpleNamespace

    from mlc_llm.serve.ray_serve import PrefixAffinityRouter, prefix_keys

    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which planet is the largest?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Jupiter."}, {"role": "user", "content": "The smallest?"}]
    k1, k2 = prefix_keys({"messages": turn1}), prefix_keys({"messages": turn2})
    assert len(k1) == 2 and k2[:2] == k1 and len(set(k2)) == 4
    other = prefix_keys({"messages": [turn1[0], {"role": "user", "content": "Hi"}]})
    assert other[0] == k1[0] and other[1] != k1[1]  # the same system prompt, another chat
    text = "x" * 600
    assert len(prefix_keys({"prompt": text})) == 3 and prefix_keys({"prompt": text + "y"})[:2] == \
        prefix_keys({"prompt": text})[:2]
    assert prefix_keys({"input": "embed me"}) == [] and prefix_keys(None) == []

    replica_id = namedtuple("ReplicaID", "unique_id")  # hashable, as Ray's
    replicas = [SimpleNamespace(replica_id=replica_id(u)) for u in ("aaaa", "bbbb", "cccc")]
    router = SimpleNamespace(_owner={})
    pick = lambda keys, cands: PrefixAffinityRouter.preferred(router, keys, cands)  # noqa: E731
    home = pick(k1, replicas)
    assert pick(k2, replicas) is home  # turn 2 hashes to turn 1's home, learned or not
    # rendezvous: removing another replica does not move a chat
    assert pick(k1, [r for r in replicas if r is home or r is replicas[(replicas.index(home) + 1) % 3]]) is home
    # learned: a chat served elsewhere (its home was busy) stays there; a match of the system prompt alone does not
    elsewhere = next(r for r in replicas if r is not home)
    router._owner = {k: elsewhere.replica_id for k in k1}
    assert pick(k2, replicas) is elsewhere
    router._owner = {k1[0]: elsewhere.replica_id}
    assert pick(k1, replicas) is home
    assert pick([], replicas) is None
