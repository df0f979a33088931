"""The REST server on the real SmolLM2 artifacts: the official `openai` client, raw HTTP (requests, curl), errors,
auth, CORS, metrics, disconnects."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import threading
import time

import openai
import pytest
import requests

from .server_utils import ServerProcess, free_port, scrape, wait_idle

KEY = "sk-test-key"
ORIGIN = "http://good.example"
SHORT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(smollm_q4, tmp_path_factory):
    port = free_port()
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode", "server",
                         "--overrides", "max_num_sequence=8;max_total_seq_length=2048",
                         "--served-model-name", "smollm", "--api-key", KEY,
                         "--allowed-origins", json.dumps([ORIGIN])], port,
                        tmp_path_factory.mktemp("server") / "server.log")
    srv.wait_health(200)
    yield srv
    assert srv.stop() in (0, -15), srv.log()[-3000:]  # uvicorn re-raises SIGTERM after its graceful shutdown
    assert "Application shutdown complete" in srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def post(server, path, body, headers=AUTH, **kw):
    return requests.post(server.url + path, json=body, headers=headers, timeout=300, **kw)


def error_of(r: requests.Response) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# ---- the official openai client ---------------------------------------------------------------------------------
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm"]


def test_chat_non_stream_and_stream_agree(client):
    whole = client.chat.completions.create(model="smollm", messages=SHORT, temperature=0, max_tokens=10)
    text = whole.choices[0].message.content
    assert "Paris" in text
    assert whole.model == "smollm" and whole.object == "chat.completion"
    assert whole.usage.completion_tokens <= 10 and whole.usage.total_tokens == (whole.usage.prompt_tokens +
                                                                                whole.usage.completion_tokens)
    chunks = list(client.chat.completions.create(model="smollm", messages=SHORT, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3  # one event per token chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_completions_stream_usage_and_extra_fields(client):
    whole = client.completions.create(model="smollm", prompt="One, two, three,", temperature=0, max_tokens=6,
                                      extra_body={"ignore_eos": True, "top_k": 1})
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="smollm", prompt="One, two, three,", temperature=0, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_max_completion_tokens_is_honoured(client):
    r = client.chat.completions.create(model="smollm", messages=SHORT, temperature=0, max_completion_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n2_and_seed_reproducible(client):
    kw = dict(model="smollm", prompt="My favourite food is", temperature=1.0, max_tokens=6, n=2, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_logprobs(client):
    r = client.chat.completions.create(model="smollm", messages=SHORT, temperature=0, max_tokens=4, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = entry.top_logprobs
        assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
        assert entry.logprob <= 0 and abs(entry.logprob - tops[0].logprob) < 1e-4  # greedy picks the top token
    c = client.completions.create(model="smollm", prompt="The sky is", temperature=0, max_tokens=3, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3 and all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


def test_stop_strings_cut_the_output(client):
    full = client.completions.create(model="smollm", prompt="One, two, three,", temperature=0, max_tokens=8,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    cut = client.completions.create(model="smollm", prompt="One, two, three,", temperature=0, max_tokens=8,
                                    stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


# ---- raw HTTP: the curl / requests examples of the original docs ---------------------------------------------------
def test_curl_example(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = {"model": "smollm", "messages": SHORT, "temperature": 0, "max_tokens": 10}
    out = subprocess.run(["curl", "-s", "-X", "POST", "-H", "Content-Type: application/json", "-H",
                          f"Authorization: Bearer {KEY}", "-d", json.dumps(body), server.url + "/v1/chat/completions"],
                         capture_output=True, text=True, timeout=300)
    reply = json.loads(out.stdout)
    assert "Paris" in reply["choices"][0]["message"]["content"]


def test_requests_streaming_example(server):
    body = {"model": "smollm", "messages": SHORT, "stream": True, "temperature": 0, "max_tokens": 10}
    events, content = [], []
    with requests.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data: ")
            events.append(line[6:])
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        chunk = json.loads(e)
        assert chunk["object"] == "chat.completion.chunk"
        content.append(chunk["choices"][0]["delta"].get("content") or "")
    assert "Paris" in "".join(content)


def test_request_id_header_echoed(server):
    r = requests.get(server.url + "/v1/models", headers={**AUTH, "X-Request-Id": "abc-123"}, timeout=10)
    assert r.headers["x-request-id"] == "abc-123"


def test_docs_page(server):
    assert requests.get(server.url + "/docs", timeout=10).status_code == 200


def test_mlc_debug_config_is_accepted_and_ignore_eos_honoured(client):
    r = client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                       max_tokens=40, extra_body={"debug_config": {
                                           "ignore_eos": True, "pinned_system_prompt": False,
                                           "special_request": None, "grammar_execution_mode": "jump_forward"}})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_completions_echo_and_suffix(server, client):
    whole = client.completions.create(model="smollm", prompt="The sky is", temperature=0, max_tokens=4, echo=True,
                                      suffix=" [end]")
    plain = client.completions.create(model="smollm", prompt="The sky is", temperature=0, max_tokens=4)
    assert whole.choices[0].text == "The sky is" + plain.choices[0].text + " [end]"
    chunks = list(client.completions.create(model="smollm", prompt="The sky is", temperature=0, max_tokens=4,
                                            echo=True, suffix=" [end]", stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] == "The sky is" and texts[-1] == " [end]"  # the prompt first, the suffix last
    assert "".join(texts) == whole.choices[0].text
    ids = client.completions.create(model="smollm", prompt=[504, 6376, 314], temperature=0, max_tokens=2, echo=True)
    assert ids.choices[0].text.startswith("The sky is")  # token-id prompts echo as text


def test_strict_model_name_restores_404():
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from mlc_llm.serve import protocol as P
    from mlc_llm.serve.server import ServerSettings, create_app

    seen = []

    async def create(**body):
        seen.append(body.get("model"))
        if body.get("model") is not None:
            raise P.ModelNotFoundError(f"model '{body['model']}' is not served here (served: m)")
        raise P.BadRequestError("stop here")

    endpoint = SimpleNamespace(create=create)
    engine = SimpleNamespace(core=SimpleNamespace(observers=[]), chat=SimpleNamespace(completions=endpoint),
                             completions=endpoint, terminate=lambda: None,
                             config=SimpleNamespace(max_num_sequence=1), metrics=lambda: {"num_waiting": 0})
    for strict, status in ((True, 404), (False, 400)):
        with TestClient(create_app(lambda: engine, "m", ServerSettings(strict_model_name=strict))) as c:
            while c.get("/health").status_code != 200:
                pass
            r = c.post("/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": SHORT})
            assert r.status_code == status, r.text
    assert seen == ["gpt-4o-mini", None]


# ---- errors ------------------------------------------------------------------------------------------------------
def test_bad_inputs_get_4xx_and_server_keeps_serving(server, client):
    r = requests.post(server.url + "/v1/chat/completions", data="{not json", headers={**AUTH, "Content-Type":
                                                                                    "application/json"}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = post(server, "/v1/chat/completions", [1, 2])
    assert r.status_code == 400 and "JSON object" in error_of(r)["message"]
    r = post(server, "/v1/chat/completions", {"messages": SHORT, "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in error_of(r)["message"]
    r = post(server, "/v1/chat/completions", {"messages": SHORT, "n": "two", "stream": True})
    assert r.status_code == 400 and "n" in error_of(r)["message"]  # stream requests fail as HTTP errors too
    r = post(server, "/v1/chat/completions", {"messages": "hello"})
    assert r.status_code == 400 and "messages" in error_of(r)["message"]
    r = post(server, "/v1/chat/completions", {"messages": SHORT, "max_tokens": 10 ** 9})
    err = error_of(r)
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "max_tokens" in err["message"]
    r = post(server, "/v1/completions", {"prompt": list(range(100, 3100)), "max_tokens": 1, "stream": True})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = post(server, "/v1/completions", {"prompt": [10 ** 7]})
    assert r.status_code == 400 and "out of range" in error_of(r)["message"]
    r = post(server, "/v1/completions", {"prompt": "hi", "bogus_field": 1})
    assert r.status_code == 400 and "bogus_field" in error_of(r)["message"]
    # a client written for another model is served by this one, which names itself in the answer
    other = client.chat.completions.create(model="gpt-4o-mini", messages=SHORT, max_tokens=2)
    assert other.model == "smollm" and other.usage.completion_tokens == 2
    r = post(server, "/v1/chat/completions", {"model": "/etc/passwd", "messages": SHORT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "smollm"  # the model field never opens a path
    r = post(server, "/v1/chat/completions", {"model": 7, "messages": SHORT})
    assert r.status_code == 400 and "model" in error_of(r)["message"]
    r = requests.post(server.url + "/v1/completions", data=b"x" * (17 * 1024 * 1024),
                      headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    ok = client.completions.create(model="smollm", prompt="The sky is", temperature=0, max_tokens=2)
    assert ok.usage.completion_tokens == 2
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


def _nested(depth: int, obj: bool = False) -> str:
    return '{"a":' * depth + "1" + "}" * depth if obj else "[" * depth + "]" * depth


_DEEP_SCHEMA = json.loads('{"type":"object","properties":{"a":' * 200 + '{"type":"string"}' + "}}" * 200)
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
# Each of these once answered 500 "internal error".
MALFORMED = {
    "a field named self": json.dumps({"messages": SHORT, "self": 1}),
    "max_tokens of 5,000 digits": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + "9" * 5000 + "}",
    "seed -1": json.dumps({"messages": SHORT, "seed": -1}),
    "an array nested 10,000 levels": '{"messages": [{"role": "user", "content": "hi"}], "x": ' + _nested(10000) + "}",
    "an object nested 10,000 levels": '{"messages": [{"role": "user", "content": "hi"}], "x": ' + _nested(10000, True)
                                      + "}",
    "a lone surrogate": '{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "tool parameters: true": json.dumps({"messages": SHORT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": True}}]}),
    "tool parameters nested 200 levels": json.dumps({"messages": SHORT, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": _DEEP_SCHEMA}}]}),
    "json_schema nested 300 levels": json.dumps({"messages": SHORT, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(
            '{"type":"array","items":' * 300 + '{"type":"string"}' + "}" * 300)}}}),
    "tool-call arguments nested 10,000 levels": json.dumps({"tools": [_TOOL], "messages": SHORT + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": _nested(10000)}}]},
        {"role": "tool", "tool_call_id": "1", "content": "x"}]}),
    "a json_object schema string nested 10,000 levels": json.dumps({"messages": SHORT, "response_format": {
        "type": "json_object", "schema": _nested(10000)}}),
}


def test_oversized_input_is_refused_before_tokenizing(server):
    """Characters beyond what the context could hold are refused at once (tokenizing 10 MB took ~10 s of the event
    loop before)."""
    huge = "word " * 2_000_000
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}),
                       ("/v1/completions", {"prompt": huge})):
        r = post(server, path, body)
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded", r.text[:200]
        assert "characters" in error_of(r)["message"]


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_400s_with_the_reason(server, case):
    body = MALFORMED[case].encode("utf-8", "surrogatepass")
    for stream in (False, True):
        data = body if not stream else body[:-1] + b', "stream": true}'
        r = requests.post(server.url + "/v1/chat/completions", data=data,
                          headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
        assert r.status_code == 400, (case, r.status_code, r.text[:300])
        message = error_of(r)["message"]
        assert "internal error" not in message and len(message) > 10, message


# ---- auth and CORS ----------------------------------------------------------------------------------------------
def test_api_key_required(server):
    r = requests.get(server.url + "/v1/models", timeout=10)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    r = requests.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and error_of(r)["message"] == "invalid API key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.get(server.url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    assert requests.get(server.url + "/health", timeout=10).status_code == 200  # probes need no key


def test_cors(server):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = requests.options(server.url + "/v1/chat/completions", headers={"Origin": ORIGIN, **pre}, timeout=10)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    bad = requests.options(server.url + "/v1/chat/completions", headers={"Origin": "http://evil.example", **pre},
                           timeout=10)
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    simple = requests.get(server.url + "/v1/models", headers={"Origin": ORIGIN, **AUTH}, timeout=10)
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    other = requests.get(server.url + "/v1/models", headers={"Origin": "http://evil.example", **AUTH}, timeout=10)
    assert "access-control-allow-origin" not in other.headers


def test_local_server_defaults_refuse_other_sites(server):
    """No CORS unless --allowed-origins says so (the fixture allows one origin; the default allows none: see
    test_server_settings_defaults), and a loopback server answers only to local Host names (DNS rebinding)."""
    for host in ("127.0.0.1", f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert requests.get(server.url + "/health", headers={"Host": host}, timeout=10).status_code == 200, host
    r = requests.get(server.url + "/v1/models", headers={"Host": f"attacker.example:{server.port}", **AUTH},
                     timeout=10)
    assert r.status_code == 400 and "attacker.example" in error_of(r)["message"]


def test_a_non_ascii_api_key_works():
    from fastapi.testclient import TestClient

    from mlc_llm.serve.server import ServerSettings, create_app

    def load():
        raise RuntimeError("no model here")

    key = "sk-clé-ключ"
    with TestClient(create_app(load, "m", ServerSettings(api_key=key))) as c:
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {key}".encode("utf-8")})
        assert ok.status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-clé".encode("utf-8")}).status_code == 401


def test_server_settings_defaults():
    from fastapi.testclient import TestClient

    from mlc_llm.serve.server import ServerSettings, create_app

    def load():
        raise RuntimeError("no model here")

    settings = ServerSettings()
    assert settings.allowed_origins == [] and settings.allowed_hosts is None
    with TestClient(create_app(load, "m", settings)) as c:
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        pre = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    with pytest.raises(ValueError, match="--allow-credentials with every origin"):
        create_app(load, "m", ServerSettings(allow_credentials=True, allowed_origins=["*"]))


def _peak_rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_body_limit_holds_for_a_chunked_upload(server):
    """A chunked body (no Content-Length) is counted as it arrives: 256 MB sent, the server never holds more than
    the 16 MB limit (it once read the whole body before checking)."""
    def body():
        for _ in range(256):
            yield b" " * (1 << 20)

    before = _peak_rss_mb(server.proc.pid)
    r = requests.post(server.url + "/v1/completions", data=body(), headers={**AUTH, "Content-Type":
                                                                            "application/json"}, timeout=60)
    assert r.status_code == 413
    assert _peak_rss_mb(server.proc.pid) - before < 100


# ---- metrics and disconnects ---------------------------------------------------------------------------------------
def test_metrics_count_requests(server, client):
    before = wait_idle(server)
    client.completions.create(model="smollm", prompt="The sky is", temperature=0, max_tokens=3,
                              extra_body={"ignore_eos": True})
    after = wait_idle(server)
    assert after["mlc_llm:generation_tokens_total"] - before["mlc_llm:generation_tokens_total"] == 3
    assert after["mlc_llm:prompt_tokens_total"] - before["mlc_llm:prompt_tokens_total"] == 3
    assert after["mlc_llm:time_to_first_token_seconds_count"] == before["mlc_llm:time_to_first_token_seconds_count"] + 1
    assert after["mlc_llm:e2e_request_latency_seconds_count"] == before["mlc_llm:e2e_request_latency_seconds_count"] + 1
    key = 'mlc_llm:request_success_total{finished_reason="length",model_name="smollm"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["mlc_llm:kv_cache_usage_perc"] == 0.0
    # MLC LLM's engine counters: 3 prompt tokens prefilled (their logits give the first token), 2 decode steps
    assert after["mlc_llm:prefill_tokens_sum_total"] - before["mlc_llm:prefill_tokens_sum_total"] == 3
    assert after["mlc_llm:decode_tokens_sum_total"] - before["mlc_llm:decode_tokens_sum_total"] == 2
    assert after["mlc_llm:engine_decode_time_sum_total"] > before["mlc_llm:engine_decode_time_sum_total"]
    assert after["mlc_llm:decode_tokens_per_s"] > 0
    steps = "mlc_llm:decode_steps_by_batch_size_total"
    assert after[steps] - before.get(steps, 0) == 2
    assert after['mlc_llm:decode_time_by_batch_size_total{batch_size="1",model_name="smollm"}'] > 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_and_frees_kv(server, stream):
    idle = wait_idle(server)
    max_tokens = 2000  # far more than can be generated before the client leaves
    body = {"model": "smollm", "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": stream}
    running_seen = threading.Event()

    def watch():
        deadline = time.time() + 60
        while time.time() < deadline and not running_seen.is_set():
            m = scrape(server.url)
            if m["mlc_llm:num_requests_running"] == 1 and m["mlc_llm:kv_cache_usage_perc"] > 0:
                running_seen.set()
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    if stream:
        with requests.post(server.url + "/v1/completions", json=body, headers=AUTH, stream=True, timeout=60) as r:
            events = 0
            for line in r.iter_lines():  # read tokens until the engine is seen running, then drop the connection
                events += line.startswith(b"data: ")
                if running_seen.is_set() and events >= 3:
                    break
            assert events >= 3
    else:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=3)
    watcher.join()
    assert running_seen.is_set()
    after = wait_idle(server, timeout=120)  # a bound against hanging, not a speed requirement
    assert after["mlc_llm:kv_cache_usage_perc"] == idle["mlc_llm:kv_cache_usage_perc"] == 0.0
    key = 'mlc_llm:request_success_total{finished_reason="abort",model_name="smollm"}'
    assert after[key] == idle.get(key, 0) + 1
    assert after["mlc_llm:generation_tokens_total"] - idle["mlc_llm:generation_tokens_total"] < max_tokens
    if not stream:  # one line in the log, not an ERROR with a CancelledError traceback
        assert "the client went away; request aborted" in server.log()
        assert "CancelledError" not in server.log()


def test_bench_serve_client_against_the_server(server):
    from mlc_llm.bench_serve import bench_serve

    [s] = bench_serve(server.url, None, [2], 2, 4, 3, False, 49152, 0, KEY, None)
    assert s["completed"] == 2 and s["failed"] == 0 and s["model"] == "smollm"
    assert s["total_input_tokens"] == 8 and s["total_output_tokens"] == 6
    assert 0 < s["median_ttft_ms"] <= s["median_e2el_ms"] and s["median_itl_ms"] > 0 and s["output_throughput"] > 0


def test_a_full_queue_answers_429_with_retry_after(smollm_q4, tmp_path):
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode",
                         "interactive", "--max-queued-requests", "1"], free_port(), tmp_path / "server.log")
    try:
        srv.wait_health(200)
        long = {"prompt": "Once upon a time", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        streams = [requests.post(srv.url + "/v1/completions", json=long, stream=True, timeout=60) for _ in range(2)]
        deadline = time.time() + 30
        while scrape(srv.url)["mlc_llm:num_requests_waiting"] < 1:  # one running, one waiting for the only slot
            assert time.time() < deadline
            time.sleep(0.05)
        r = requests.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert error_of(r)["code"] == "queue_full"
        for s in streams:
            s.close()
        deadline = time.time() + 30
        while True:  # the queue drains: served again
            r = requests.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 429 and time.time() < deadline
            time.sleep(0.2)
    finally:
        srv.stop()


def test_sigterm_lets_short_requests_finish_and_ends_long_streams_in_band(smollm_q4, tmp_path):
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode", "local",
                         "--shutdown-timeout", "5"], free_port(), tmp_path / "server.log")
    srv.wait_health(200)
    events: dict[int, list[str]] = {}

    def stream(i: int, max_tokens: int) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=120) as r:
            events[i] = [line.decode() for line in r.iter_lines() if line]

    # the short one: long enough to be seen running (4 tokens once finished between two polls), short enough to end
    # well within the 5 s grace
    threads = [threading.Thread(target=stream, args=(i, n)) for i, n in enumerate((3000, 3000, 64))]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while scrape(srv.url)["mlc_llm:num_requests_running"] < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0  # exits 0, not by the signal
    for t in threads:
        t.join(60)
    for i in (0, 1):  # ended by the grace period: an error event, then [DONE]
        assert events[i][-1] == "data: [DONE]"
        err = json.loads(events[i][-2][6:])["error"]
        assert err["code"] == "shutting_down" and "shutting down" in err["message"]
    assert events[2][-1] == "data: [DONE]" and "error" not in "".join(events[2])  # finished within the grace
    assert "Traceback" not in srv.log()
    srv.stop()


def test_cached_prompt_tokens_are_reported_and_the_cache_can_be_reset(server, client):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 30},
                {"role": "user", "content": "Name a prime number."}]
    first = client.chat.completions.create(model="smollm", messages=messages, max_tokens=4, temperature=0)
    second = client.chat.completions.create(model="smollm", messages=messages, max_tokens=4, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1 > 100
    assert second.choices[0].message.content == first.choices[0].message.content
    m = wait_idle(server)  # POST /reset_prefix_cache, then nothing is left in the KV cache
    assert m["mlc_llm:kv_cache_usage_perc"] == 0.0 and m["mlc_llm:prefix_cache_sequences"] == 0
    assert 0 < m["mlc_llm:prefix_cache_hit_rate"] < 1 and m["mlc_llm:prefix_cache_hit_tokens_sum_total"] > 100
    third = client.chat.completions.create(model="smollm", messages=messages, max_tokens=4, temperature=0)
    assert third.usage.prompt_tokens_details.cached_tokens == 0
    r = requests.post(server.url + "/reset_prefix_cache")  # the endpoint needs the key like the others
    assert r.status_code == 401
