"""Schemathesis against the real server's /openapi.json: generated requests (valid ones and ones the server must
refuse) to the three POST endpoints on the real SmolLM2 model. No answer may be a 5xx, and every answer must have a
documented status, content type and body schema.

Schemathesis runs as its CLI (`schemathesis run`), the way it is run against any API; its pytest integration for a
schema from a fixture does not work on pytest 9.2 (schemathesis 4.32 sets `node._nodeid`, which pytest dropped).
Bounded: MAX_EXAMPLES generated cases per operation and phase plus the deterministic coverage cases, a fixed seed, a
small context window, and `n` / `max_tokens` of valid requests cut to small values by the `before_call` hook below (the
CLI imports this module through SCHEMATHESIS_HOOKS), so no case asks the CPU for minutes of generation (n=128 × 200
tokens would). The last test checks the document itself, without a model.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from .conftest import REPO
from .server_utils import ServerProcess, free_port

CONTEXT = 256  # tokens of one sequence (prompt + answer); a longer prompt is a 400
MAX_EXAMPLES = 30  # per operation and phase
TIMEOUT_S = 600  # the whole schemathesis run (a bound against hanging)
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def bounded(body):
    """A valid `n` or `max_tokens` made small (values the server must refuse are left as they are)."""
    if isinstance(body, dict):
        if type(body.get("n")) is int and 2 < body["n"] <= 128:
            body["n"] = 2
        for key in ("max_tokens", "max_completion_tokens"):
            if type(body.get(key)) is int and 16 < body[key] < CONTEXT:
                body[key] = 16
    return body


if os.environ.get("SCHEMATHESIS_HOOKS") == __name__:  # imported by the schemathesis CLI, not by pytest
    import schemathesis

    @schemathesis.hook
    def before_call(context, case, kwargs):
        case.body = bounded(case.body)


@pytest.fixture(scope="module")
def fuzz_server(smollm_q4, tmp_path_factory):
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu", "--mode", "server",
                         "--overrides", f"max_num_sequence=4;max_total_seq_length={CONTEXT}"], free_port(),
                        tmp_path_factory.mktemp("schemathesis") / "server.log")
    srv.wait_health(200)
    yield srv
    assert srv.stop() in (0, -15), srv.log()[-3000:]


def test_post_endpoints_conform_to_openapi(fuzz_server, tmp_path):
    report = tmp_path / "events.ndjson"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", fuzz_server.url + "/openapi.json",
           "--include-method", "POST", "--include-path-regex", "^/v1/(chat/completions|completions|embeddings)$",
           "--checks", CHECKS, "--phases", "examples,coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
           "--seed", "1", "--workers", "1", "--request-timeout", "120", "--suppress-health-check", "all",
           "--report", "ndjson", "--report-ndjson-path", str(report)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCHEMATHESIS_HOOKS": __name__, "NO_COLOR": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT_S)
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:] + "\nserver:\n" + fuzz_server.log()[-3000:]
    assert "Traceback" not in fuzz_server.log(), fuzz_server.log()[-5000:]  # e.g. an error event in a 200 stream

    # The valid cases got past validation to generation; a chat model refuses embeddings (400, as documented).
    statuses: Counter = Counter()
    for line in report.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished") or {}
        for exchange in scenario.get("recorder", {}).get("interactions", {}).values():
            if exchange.get("response") and "/v1/" in exchange["request"]["uri"]:  # (POST /reset_prefix_cache too)
                statuses[exchange["request"]["uri"].rsplit("/v1/", 1)[1], exchange["response"]["status_code"]] += 1
    print(dict(statuses))
    assert statuses["chat/completions", 200] > 0 and statuses["completions", 200] > 0, statuses
    assert statuses["embeddings", 400] > 0 and statuses["embeddings", 200] == 0, statuses


def test_openapi_document_describes_the_bodies():
    """Model-free: create_app's document names the request and response models, every reference resolves, and the
    request schemas agree with the server on a few bodies."""
    import schemathesis
    from jsonschema import Draft202012Validator

    from mlc_llm.serve.server import create_app

    doc = create_app(lambda: None, "m").openapi()  # the engine never loads: the app is not started
    models = {"/v1/chat/completions": ("ChatCompletionRequest", "ChatCompletionResponse"),
              "/v1/completions": ("CompletionRequest", "CompletionResponse"),
              "/v1/embeddings": ("EmbeddingRequest", "EmbeddingResponse")}
    for path, (request, response) in models.items():
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + response)
        assert set(op["responses"]) == {"200", "400", "401", "404", "413", "429", "503"}
    names = set(doc["components"]["schemas"])
    assert set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc))) <= names
    assert all(hasattr(result, "ok") for result in schemathesis.openapi.from_dict(doc).get_all_operations())  # no Err

    def valid(name, body):
        return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]}) \
            .is_valid(body)

    hi = {"role": "user", "content": "hi"}
    assert valid("ChatCompletionRequest", {"messages": [hi], "n": 2, "stop": ["a"], "logit_bias": {"5": -100}})
    assert valid("ChatCompletionRequest", {"messages": [hi, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}]})
    for bad in ({"messages": []}, {"messages": [{"role": "user", "content": " "}]}, {"messages": [hi], "n": 0},
                {"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, {"messages": [hi], "x": 1},
                {"messages": [hi], "top_logprobs": 2}, {"messages": [hi], "tool_choice": "auto"},
                {"messages": [hi], "response_format": {"type": "json_schema"}}):
        assert not valid("ChatCompletionRequest", bad), bad
    assert valid("CompletionRequest", {"prompt": [1, 2]}) and not valid("CompletionRequest", {"prompt": ""})
    assert valid("EmbeddingRequest", {"input": ["a", "b"]}) and not valid("EmbeddingRequest", {"input": [[]]})
