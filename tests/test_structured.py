"""Structured output on the real SmolLM2 model (built by the pipeline): JSON schemas, JSON mode, bad formats.

The grammar guarantees the structure; jsonschema (an independent validator) checks every answer.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from mlc_llm import MLCEngine
from mlc_llm.serve.protocol import BadRequestError

S = {"type": "string", "maxLength": 40}
SCHEMAS = [
    ("a person", {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                  "required": ["name", "age"]}),
    ("a city", {"type": "object", "properties": {
        "city": S, "country": S, "population": {"type": "integer", "minimum": 0, "maximum": 40000000}},
                "required": ["city", "country", "population"]}),
    ("a shopping list", {"type": "object", "properties": {
        "items": {"type": "array", "items": S, "minItems": 1, "maxItems": 5}}, "required": ["items"]}),
    ("a book", {"type": "object", "properties": {
        "title": S, "author": {"type": "object", "properties": {"first": S, "last": S}, "required": ["first", "last"]},
        "year": {"type": "integer", "minimum": 1400, "maximum": 2030}}, "required": ["title", "author", "year"]}),
    ("the weather", {"type": "object", "properties": {
        "condition": {"enum": ["sunny", "rainy", "cloudy", "snowy"]},
        "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60}},
        "required": ["condition", "temperature_c"]}),
    ("a yes or no answer to: is the sky blue?", {"type": "object", "properties": {"answer": {"type": "boolean"}},
                                                  "required": ["answer"]}),
    ("a color", {"type": "object", "properties": {
        "name": S, "rgb": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255},
                           "minItems": 3, "maxItems": 3}}, "required": ["name", "rgb"]}),
    ("a movie rating", {"type": "object", "properties": {
        "movie": S, "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]}}, "required": ["movie", "stars"]}),
    ("a point in 3D", {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                                         "z": {"type": "number"}}, "required": ["x", "y", "z"]}),
    ("a to-do item", {"type": "object", "properties": {
        "task": S, "done": {"type": "boolean"}, "priority": {"enum": ["low", "medium", "high"]}},
        "required": ["task", "done", "priority"]}),
    ("a list of three numbers", {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}),
    ("a country and its capital", {"type": "object", "properties": {"country": S, "capital": S},
                                   "required": ["country", "capital"]}),
    ("an animal", {"type": "object", "properties": {
        "species": S, "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "habitat": {"enum": ["land", "water", "air"]}}, "required": ["species", "legs", "habitat"]}),
    ("a recipe", {"type": "object", "properties": {
        "dish": S, "ingredients": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object", "properties": {"name": S, "grams": {"type": "integer", "minimum": 1, "maximum": 1000}},
            "required": ["name", "grams"]}}}, "required": ["dish", "ingredients"]}),
    ("an order", {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 99999},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "total": {"type": "number", "minimum": 0}}, "required": ["id", "status", "total"]}),
    ("a user profile", {"type": "object", "properties": {
        "username": {"type": "string", "pattern": "^[a-z]{3,12}$"}, "email": S, "verified": {"type": "boolean"}},
        "required": ["username", "verified"]}),
    ("a date", {"type": "object", "properties": {
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100}, "month": {"type": "integer", "minimum": 1,
                                                                                "maximum": 12},
        "day": {"type": "integer", "minimum": 1, "maximum": 31}}, "required": ["year", "month", "day"]}),
    ("a company", {"type": "object", "properties": {
        "name": S, "employees": {"type": "integer", "minimum": 1, "maximum": 100000},
        "address": {"type": "object", "properties": {"street": S, "city": S, "zip": {"type": "string",
                                                                                      "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]}}, "required": ["name", "employees", "address"]}),
    ("a team of two people", {"type": "object", "properties": {
        "team": S, "members": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "properties": {"name": S, "role": {"enum": ["lead", "dev", "qa"]}},
            "required": ["name", "role"]}}}, "required": ["team", "members"]}),
    ("a sentiment analysis of: I love this!", {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["sentiment", "confidence"]}),
]


@pytest.fixture(scope="module")
def engine(smollm_q4):
    e = MLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), device="cpu",
                  overrides="max_num_sequence=20;max_total_seq_length=8192")
    yield e
    e.terminate()


def _ask(engine, i, what, schema):
    # every other request uses MLC LLM's form: {"type": "json_object", "schema": "<JSON text>"}
    fmt = ({"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}} if i % 2 == 0
           else {"type": "json_object", "schema": json.dumps(schema)})
    r = engine.chat.completions.create(messages=[{"role": "user", "content": f"Describe {what} in JSON."}],
                                       response_format=fmt, max_tokens=300, seed=i, repetition_penalty=1.1)
    return r.choices[0]


def test_twenty_json_schemas_every_answer_validates(engine):
    assert len(SCHEMAS) == 20 and len({json.dumps(s) for _, s in SCHEMAS}) == 20
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # all at once: the masks of the whole batch are built together
        choices = list(pool.map(lambda a: _ask(engine, *a), [(i, w, s) for i, (w, s) in enumerate(SCHEMAS)]))
    for (what, schema), choice in zip(SCHEMAS, choices):
        assert choice.finish_reason == "stop", (what, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
    stats = engine.metrics()
    assert max(stats["decode_batch_sizes"]) > 1  # they really ran batched


def test_strict_schema_closes_objects_and_stream_equals_json(engine):
    schema = {"type": "object", "properties": {"city": S, "country": S}, "required": ["city", "country"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    msgs = [{"role": "user", "content": "Name a big city in JSON."}]
    text = "".join(c.choices[0].delta.content or "" for c in engine.chat.completions.create(
        messages=msgs, response_format=fmt, max_tokens=200, stream=True, temperature=0) if c.choices)
    obj = json.loads(text)
    closed = dict(schema, additionalProperties=False)  # strict: no keys beyond the schema's
    jsonschema.validate(obj, closed)
    whole = engine.chat.completions.create(messages=msgs, response_format=fmt, max_tokens=200, temperature=0)
    assert whole.choices[0].message.content == text


@pytest.mark.parametrize("prompt", ["Give a JSON object with the name and age of a person.",
                                    "Give the capital of France as a JSON object.",
                                    "List two fruits as a JSON object.",
                                    "Describe a dog in JSON."])
def test_json_object_mode_always_parses(engine, prompt):
    r = engine.chat.completions.create(messages=[{"role": "user", "content": prompt}],
                                       response_format={"type": "json_object"}, max_tokens=300, temperature=0,
                                       repetition_penalty=1.1)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_completions_endpoint_takes_a_schema(engine):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    r = engine.completions.create(prompt="Is water wet? Answer in JSON: ", max_tokens=50, temperature=0,
                                  response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), schema)


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "invalid JSON schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": "[a-"}}}}}, "not a 'regex'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "format": "credit-card"}}}}}, "cannot build a grammar"),
    ({"type": "json_object", "schema": "{not json"}, "not valid JSON"),
    ({"type": "json_object", "schema": {"minimum": "ten"}}, "invalid JSON schema"),
    ({"type": "xml"}, "response_format"),
    ({"type": "text", "schema": {"type": "object"}}, "needs type"),
])
def test_bad_response_formats_fail_clearly(engine, fmt, message):
    with pytest.raises(BadRequestError, match=message):
        engine.chat.completions.create(messages=[{"role": "user", "content": "hi"}], response_format=fmt)


def test_masks_built_during_the_forward_pass_give_the_same_answer(engine):
    """The GPU path (masks on a helper thread while the model runs), forced on here: same tokens as in line."""
    schema = SCHEMAS[9][1]
    kw = dict(messages=[{"role": "user", "content": "Describe a to-do item in JSON."}], temperature=0, max_tokens=100,
              response_format={"type": "json_schema", "json_schema": {"name": "todo", "schema": schema}})
    inline = engine.chat.completions.create(**kw).choices[0].message.content
    engine.core._masks_overlap = True
    try:
        overlapped = engine.chat.completions.create(**kw).choices[0].message.content
    finally:
        engine.core._masks_overlap = False
    assert overlapped == inline
    jsonschema.validate(json.loads(inline), schema)


class _BreaksAfter:
    """An llguidance matcher that breaks after `n` tokens, the way a grammar can fail at run time: `mode` "consume"
    refuses the next token, "mask" makes computing its token mask raise (a fault injected into the real engine)."""

    def __init__(self, inner, n: int, mode: str):
        self._inner, self._left, self._mode = inner, n, mode

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def consume_token(self, t):
        self._left -= 1
        return self._inner.consume_token(t) and not (self._mode == "consume" and self._left < 0)

    def get_error(self):
        return "injected failure" if self._left < 0 else self._inner.get_error()

    def unwrap(self):
        if self._mode == "mask" and self._left < 0:
            raise RuntimeError("injected mask failure")
        return self._inner


@pytest.mark.parametrize("mode", ["consume", "mask"])
def test_a_grammar_failing_mid_answer_ends_only_its_request(engine, monkeypatch, mode):
    from mlc_llm.serve import grammar as G

    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    plain = dict(messages=[{"role": "user", "content": "Name three colours."}], temperature=0, max_tokens=24)
    good = dict(messages=[{"role": "user", "content": "Give me a JSON object."}], temperature=0, max_tokens=24,
                response_format=fmt)
    alone = [engine.chat.completions.create(**kw).choices[0].message.content for kw in (plain, good)]
    bad_text = "Give a JSON object, please."
    real_allowed = G.allowed_tokens
    broken: list[_BreaksAfter] = []

    def allowed(matchers, vocab):
        return real_allowed([m.unwrap() if isinstance(m, _BreaksAfter) else m for m in matchers], vocab)

    class Breaking:  # the request's grammar, handing out matchers that break
        def __init__(self, grammar):
            self.grammar = grammar

        def matcher(self):
            broken.append(_BreaksAfter(self.grammar.matcher(), 4, mode))
            return broken[-1]

    def prepare(kwargs, _orig=engine._prepare_chat):
        req, prompt, gen, tools = _orig(kwargs)
        if kwargs["messages"][0]["content"] == bad_text:
            gen.grammar = Breaking(gen.grammar)
        return req, prompt, gen, tools

    monkeypatch.setattr(G, "allowed_tokens", allowed)
    monkeypatch.setattr(engine, "_prepare_chat", prepare)
    bad = dict(good, messages=[{"role": "user", "content": bad_text}])
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(engine.chat.completions.create, **kw) for kw in (plain, bad, good)]
        with pytest.raises(RuntimeError, match="response grammar failed: injected"):
            futures[1].result()
        results = [futures[0].result().choices[0].message.content, futures[2].result().choices[0].message.content]
    assert broken and results == alone  # the bystanders (one constrained, one not) got exactly their own answers
    engine.reset_prefix_cache()
    m = engine.metrics()
    assert m["num_running"] == 0 and m["kv_pages_free"] == m["kv_pages_total"]
