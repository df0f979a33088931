"""Grammar-constrained decoding with llguidance: JSON mode, JSON schemas and forced tool calls.

A request with a grammar gets one `LLMatcher` per sequence. Each step the sampler asks llguidance for the token masks
of every constrained row of the batch at once (`LLExecutor`, in parallel; 0.02-0.5 ms per row on SmolLM2's 49k
vocabulary, see docs/BENCHMARKS.md)
and sets the disallowed logits to -inf; the sampled token then advances the row's matcher. When the grammar is
complete only the stop token stays allowed.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .protocol import BadRequestError, check_json_value, parse_json

# Compact JSON, no free whitespace: a small model cannot wander off into endless newlines, and the output is still
# plain JSON that any parser reads.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def check_json_schema(schema: Any, where: str) -> None:
    """A clear 400 for a schema that is not a JSON schema (jsonschema's meta-schema check)."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise BadRequestError(f"{where}: a JSON schema must be an object, got {type(schema).__name__}")
    check_json_value(schema, where)  # the Python API gets no body check: the depth limit here too
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise BadRequestError(f"{where}: invalid JSON schema{f' at {path}' if path else ''}: {e.message}") from None


def close_objects(schema: Any) -> Any:
    """A copy where every object schema without `additionalProperties` gets `false`: what OpenAI's strict mode means,
    and what function arguments need (a small model otherwise keeps inventing keys)."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) if k in _SUBSCHEMA_KEYS else v for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: close_objects(v) for name, v in schema[k].items()}
    if (schema.get("type") == "object" or "properties" in schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


_SUBSCHEMA_KEYS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "if", "then", "else",
                   "additionalProperties", "contains")


def json_schema_rule(schema: Any) -> str:
    """A Lark fragment that matches JSON valid for `schema` (llguidance's %json extension)."""
    return "%json " + json.dumps({**(schema if isinstance(schema, dict) else {}), "x-guidance": JSON_OPTIONS})


class GrammarBackend:
    """One per engine: the llguidance view of the tokenizer (built once, ~0.3 s, on first use)."""

    def __init__(self, model_dir: Path, vocab_size: int, stop_token_ids: list[int]):
        self._model_dir = model_dir
        self._vocab_size = vocab_size
        self._stop = list(stop_token_ids)
        self._tok = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self):
        with self._lock:
            if self._tok is None:
                import llguidance

                text = (self._model_dir / "tokenizer.json").read_text(encoding="utf-8")
                self._tok = llguidance.LLTokenizer(text, n_vocab=self._vocab_size, eos_token=self._stop or None)
            return self._tok

    def single_tokens(self, texts) -> frozenset[str]:
        """Those of `texts` that are one special token of the vocabulary (llguidance matches them only as tokens)."""
        tok = self.tokenizer
        out = set()
        for text in texts:
            ids = tok.tokenize_str(text)
            if len(ids) == 1 and tok.is_special_token(ids[0]):
                out.add(text)
        return frozenset(out)

    def compile(self, lark: str, what: str) -> "Grammar":
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise BadRequestError(f"{what}: cannot build a grammar: {messages[0]}")
        return Grammar(self, grammar)

    def json(self, schema: Any, what: str) -> "Grammar":
        return self.compile(f"start: {json_schema_rule(schema)}", what)


@dataclass
class Grammar:
    backend: GrammarBackend
    text: str  # llguidance's serialized grammar

    def matcher(self):
        import llguidance

        m = llguidance.LLMatcher(self.backend.tokenizer, self.text, log_level=0)
        if m.is_error():
            raise BadRequestError(f"grammar: {m.get_error()}")
        return m


_executor = None
_executor_lock = threading.Lock()


def allowed_tokens(matchers: list, vocab: int) -> np.ndarray:
    """Masks of several matchers, computed together: bool [len(matchers), vocab], True = allowed."""
    global _executor
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor(num_threads=max(1, os.cpu_count() or 1))
    bits = allocate_token_bitmask(len(matchers), vocab)
    fill_next_token_bitmask_par(_executor, [(m, i) for i, m in enumerate(matchers)], bits)
    return np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)


def response_format_grammar(backend: GrammarBackend, fmt) -> tuple[Optional[Grammar], Optional[str]]:
    """OpenAI's `response_format` (and MLC's {"type": "json_object", "schema": ...}) -> (grammar, an instruction for
    the system prompt), or (None, None) for text. With `strict`, objects without `additionalProperties` are closed."""
    if fmt is None or fmt.type == "text":
        if fmt is not None and (fmt.json_schema or fmt.schema_):
            raise BadRequestError("response_format: a schema needs type 'json_schema' or 'json_object'")
        return None, None
    if fmt.type == "json_object":
        schema = fmt.schema_
        if isinstance(schema, str):  # MLC sends the schema as a JSON string
            schema = parse_json(schema, "response_format.schema")
        where, strict = "response_format.schema", False
    else:  # json_schema
        spec = fmt.json_schema
        if not isinstance(spec, dict):
            raise BadRequestError("response_format.json_schema is required for type 'json_schema' "
                                  "({\"name\": ..., \"schema\": {...}})")
        unknown = set(spec) - {"name", "schema", "strict", "description"}
        if unknown:
            raise BadRequestError(f"response_format.json_schema: unknown field(s) {', '.join(sorted(unknown))}")
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise BadRequestError("response_format.json_schema.name is required (a non-empty string)")
        schema, where, strict = spec.get("schema"), "response_format.json_schema.schema", bool(spec.get("strict"))
    if schema is None:
        return backend.json({"type": "object"}, "response_format"), "Answer with a JSON object only."
    check_json_schema(schema, where)
    if strict:
        schema = close_objects(schema)
    instruction = "Answer with JSON only, following this JSON schema: " + json.dumps(schema, ensure_ascii=False)
    return backend.json(schema, where), instruction
