"""The server under faults a real deployment meets (real SmolLM2): clients that send slowly or vanish in numbers,
requests that run past the time limit. Each test bounds its waits (against hanging); passes are decided by what the
server answered, not by how fast."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from .server_utils import ServerProcess, free_port, scrape, wait_idle

PROMPT = {"model": "smollm", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def server(smollm_q4, tmp_path_factory):
    port = free_port()
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode", "server",
                         "--overrides", "max_num_sequence=8;max_total_seq_length=4096", "--served-model-name",
                         "smollm", "--header-timeout", "2", "--body-timeout", "2", "--request-timeout", "4"], port,
                        tmp_path_factory.mktemp("faults") / "server.log")
    srv.wait_health(200)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log(), srv.log()[-3000:]  # every fault above was an expected one


def _completion(server, **kw) -> requests.Response:
    return requests.post(server.url + "/v1/completions", json={**PROMPT, **kw}, timeout=120)


def _closed_by_server(sock: socket.socket, bound: float = 60) -> bytes:
    """Read until the server closes the connection; what it sent."""
    sock.settimeout(bound)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_client_sending_headers_byte_by_byte_stalls_nobody_and_is_cut_off(server):
    expected = _completion(server).json()["choices"][0]["text"]
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nContent-Type: application/json\r\n"
            "X-Padding: " + "a" * 200 + "\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sent, stop = [0], threading.Event()

    def trickle():
        try:
            for byte in head:
                if stop.is_set():
                    return
                sock.send(bytes([byte]))
                sent[0] += 1
                time.sleep(0.05)
        except OSError:  # the server closed the connection
            pass

    t = threading.Thread(target=trickle)
    t.start()
    try:
        time.sleep(0.3)
        assert _completion(server).json()["choices"][0]["text"] == expected  # served while the trickle goes on
        assert t.is_alive() and sent[0] < len(head)
        assert _closed_by_server(sock) == b""  # cut off after --header-timeout, nothing answered
        assert sent[0] < len(head)  # before its headers were complete
    finally:
        stop.set()
        t.join()
        sock.close()


def test_a_stalled_body_gets_408(server):
    body = json.dumps(PROMPT).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        answer = _closed_by_server(sock).decode()
    finally:
        sock.close()
    assert answer.startswith("HTTP/1.1 408"), answer[:300]
    assert '"code":"body_timeout"' in answer.replace(" ", "")


def test_requests_past_the_time_limit_end_cleanly(server):
    idle = wait_idle(server)
    long = {"max_tokens": 3000, "ignore_eos": True}
    r = _completion(server, **long)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    events = []
    with requests.post(server.url + "/v1/completions", json={**PROMPT, **long, "stream": True}, timeout=120,
                       stream=True) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith(b"data: "):
                events.append(line[6:])
    assert events[-1] == b"[DONE]" and len(events) > 3  # tokens, then the error in band, then [DONE]
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    after = wait_idle(server)
    assert after["mlc_llm:kv_cache_usage_perc"] == idle["mlc_llm:kv_cache_usage_perc"] == 0.0
    assert _completion(server).status_code == 200


def test_a_storm_of_disconnects_leaves_nothing_running(server):
    before = _completion(server).json()["choices"][0]["text"]
    idle = wait_idle(server)
    body = {**PROMPT, "max_tokens": 2000, "ignore_eos": True, "prompt": "Once upon a time"}
    errors = []

    def dropped_stream(i):
        try:
            with requests.post(server.url + "/v1/completions", json={**body, "stream": True}, stream=True,
                               timeout=120) as r:
                chunks = 0
                for line in r.iter_lines():
                    chunks += line.startswith(b"data: ")
                    if chunks >= 1 + i % 5:
                        break  # leaves: the connection closes here
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    def cancelled(i):
        try:
            requests.post(server.url + "/v1/completions", json=body, timeout=0.5 + 0.1 * (i % 5))
        except requests.exceptions.ReadTimeout:
            return
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=dropped_stream, args=(i,)) for i in range(50)]
    threads += [threading.Thread(target=cancelled, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    after = wait_idle(server, timeout=120)  # a bound against hanging
    assert after["mlc_llm:kv_cache_usage_perc"] == 0.0
    assert after["mlc_llm:generation_tokens_total"] - idle["mlc_llm:generation_tokens_total"] < 70 * 2000
    assert _completion(server).json()["choices"][0]["text"] == before
    m = scrape(server.url)
    assert m["mlc_llm:num_requests_running"] == 0 and m["mlc_llm:num_requests_waiting"] == 0


def test_an_unexpected_error_is_a_500_before_a_stream_and_an_in_band_event_after(smollm_q4, monkeypatch):
    """Faults injected into the real engine behind the real app: a bug while preparing a request answers an
    OpenAI-shaped 500 (logged with its traceback); a bug after a stream has started ends it with an error event and
    [DONE]; the server goes on serving."""
    from fastapi.testclient import TestClient

    from mlc_llm import AsyncMLCEngine
    from mlc_llm.serve import engine as E
    from mlc_llm.serve.server import ServerSettings, create_app

    app = create_app(lambda: AsyncMLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), device="cpu"),
                     "smollm", ServerSettings())
    body = {"messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 12, "temperature": 0}
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.time() + 120
        while client.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        normal = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        with monkeypatch.context() as m:
            def broken(self, kwargs):
                raise ZeroDivisionError("injected")
            m.setattr(E._EngineBase, "_prepare_chat", broken)
            r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "ZeroDivisionError: injected" in error["message"]
        real_chunk, seen = E._Formatter.chunk, [0]

        def failing_chunk(self, d):
            seen[0] += 1
            if seen[0] > 3:
                raise KeyError("injected after the stream started")
            return real_chunk(self, d)

        with monkeypatch.context() as m:
            m.setattr(E._Formatter, "chunk", failing_chunk)
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                assert s.status_code == 200
                events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["type"] == "server_error" and "injected after the stream started" in err["message"]
        assert any("choices" in json.loads(e) for e in events[:-2])  # tokens came first
        after = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        assert after == normal
