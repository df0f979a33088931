"""The request and response bodies of the generation endpoints in the server's OpenAPI document (/openapi.json).

The POST endpoints read their bodies raw (read_json: size limit, depth limit, OpenAI-style 400s) and validate them with
the pydantic models of protocol.py themselves, so FastAPI knows nothing of those bodies and its generated document
says only "200, any JSON". `describe_request_bodies(app)` fills the three operations in from the same models: the
request body, the 200 answer (JSON, or server-sent events when `stream` is true) and the OpenAI error object of every
error status the server gives. Clients, /docs and schema-based fuzzers (schemathesis, in the tests) then see the
contract the server really enforces.

pydantic's schema shows the field types and ranges; RULES adds what the models' validators and the engine check beyond
them (non-empty lists and texts, which roles carry which fields, the shape of tools). What depends on the model or on
other messages (token ids below the vocabulary size, prompt + max_tokens within the context window, a tool result
answering a call of the assistant message before it) is left to the 400 answer.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import protocol as P

REF = "#/components/schemas/{model}"

# path -> (request model, JSON answer, one streamed event or None where the endpoint does not stream)
ENDPOINTS: dict[str, tuple[type[BaseModel], type[BaseModel], type[BaseModel] | None]] = {
    "/v1/chat/completions": (P.ChatCompletionRequest, P.ChatCompletionResponse, P.ChatCompletionStreamResponse),
    "/v1/completions": (P.CompletionRequest, P.CompletionResponse, P.CompletionResponse),
    "/v1/embeddings": (P.EmbeddingRequest, P.EmbeddingResponse, None),
}

NON_BLANK = {"pattern": r"\S"}
FUNCTION_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
TOOL = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": FUNCTION_NAME, "description": {"type": "string"}, "strict": {},
        "parameters": {"type": "object", "properties": {"type": {"const": "object"}},
                       "description": "a JSON schema of the arguments object"}}}}}
TOOL_CALL = {"type": "object", "required": ["id", "function"], "properties": {
    "id": {"type": "string", "minLength": 1}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1},
        "arguments": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object"}}}}}}
SAMPLING = {  # fields of both generation requests
    "stop": {"maxItems": 16},
    "logit_bias": {"propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": {"minimum": -100, "maximum": 100},
                   "description": "token id (below the vocabulary size) -> bias"},
}
USES_TOOLS = {"required": ["tools"],
              "properties": {"tools": {"type": "array"}, "tool_choice": {"not": {"const": "none"}}}}

# component -> {field: keywords added to the field's schema, None: keywords added to the component's own schema}. A
# keyword of one JSON type (minItems, pattern, required...) next to an `anyOf` of types constrains only that type.
RULES: dict[str, dict[str | None, dict[str, Any]]] = {
    "ChatCompletionRequest": {
        **SAMPLING,
        "messages": {"minItems": 1},
        "tools": {"minItems": 1, "items": TOOL},
        "tool_choice": {"pattern": "^(none|auto|required)$", "required": ["type", "function"], "properties": {
            "type": {"const": "function"}, "function": {"type": "object", "required": ["name"], "properties": {
                "name": FUNCTION_NAME}}}, "description": "a function named here must be one of tools"},
        None: {"allOf": [
            {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
             "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
            {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": [None, "none"]}}}},
             "then": {"required": ["tools"], "properties": {"tools": {"type": "array"}}}},
            {"if": USES_TOOLS, "then": {"properties": {"response_format": {
                "anyOf": [{"type": "null"}, {"properties": {"type": {"const": "text"}}}]}}}}]}},
    "CompletionRequest": {**SAMPLING, "prompt": {"minLength": 1, "minItems": 1, "items": {"minimum": 0}}},
    "EmbeddingRequest": {"input": {"minLength": 1, "minItems": 1, "maxItems": P.MAX_EMBEDDING_INPUTS,
                                   "items": {"minLength": 1, "minItems": 1, "minimum": 0, "items": {"minimum": 0}}}},
    "ChatMessage": {
        "tool_calls": {"items": TOOL_CALL},
        "tool_call_id": {"description": "the id of a tool call of the assistant message just before"},
        None: {"allOf": [  # system and user messages have text; only assistants call tools; only tools answer them
            {"if": {"properties": {"role": {"enum": ["system", "user"]}}},
             "then": {"required": ["content"], "properties": {"content": {
                 "type": ["string", "array"], **NON_BLANK, "contains": {"properties": {"text": NON_BLANK}}}}}},
            {"if": {"properties": {"role": {"const": "assistant"}}},
             "else": {"properties": {"tool_calls": {"type": "null"}}}},
            {"if": {"properties": {"role": {"const": "tool"}}},
             "then": {"required": ["tool_call_id"], "properties": {"tool_call_id": {"type": "string", "minLength": 1}}},
             "else": {"properties": {"tool_call_id": {"type": "null"}}}}]}},
    "ResponseFormat": {
        "json_schema": {"required": ["name"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "minLength": 1}, "schema": {"type": "object"}, "strict": {},
            "description": {}}},
        "schema": {"contentMediaType": "application/json", "description": "a JSON schema, or its JSON text"},
        None: {"allOf": [  # type text (the default) has no schema; json_schema needs one
            {"if": {"properties": {"type": {"const": "text"}}},
             "then": {"properties": {"json_schema": {"type": "null"}, "schema": {"type": "null"}}}},
            {"if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
             "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}}]}},
}

ERRORS = {
    "400": "Invalid request: malformed JSON, a field out of range, a prompt over the context window, or a model "
           "that does not serve this endpoint",
    "401": "Missing or wrong API key (only when the server runs with --api-key)",
    "404": "The request names another model (only with a strict model name)",
    "413": "Request body over the size limit",
    "429": "Too many requests waiting; retry after the Retry-After header's seconds",
    "503": "The model is still loading or failed to load, or the server is shutting down",
}

ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "properties": {"error": {
        "type": "object",
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
        "required": ["message", "type", "param", "code"],
    }},
    "required": ["error"],
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _operation_bodies(components: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """path -> {"requestBody", "responses"}; adds the models' schemas to `components`."""
    models = [(req, "validation") for req, _, _ in ENDPOINTS.values()]
    models += [(m, "serialization") for _, resp, chunk in ENDPOINTS.values() for m in (resp, chunk) if m]
    refs, defs = models_json_schema(list(dict.fromkeys(models)), ref_template=REF)
    components.update(defs["$defs"])
    for name, fields in RULES.items():
        for field, keywords in fields.items():
            (components[name] if field is None else components[name]["properties"][field]).update(keywords)
    components["ErrorResponse"] = ERROR_SCHEMA
    error = {"application/json": {"schema": _ref("ErrorResponse")}}
    out = {}
    for path, (req, resp, chunk) in ENDPOINTS.items():
        ok: dict[str, Any] = {"application/json": {"schema": refs[(resp, "serialization")]}}
        if chunk is not None:  # with `stream: true`; the schema describes one event, as OpenAPI 3.2 reads it
            data = {"anyOf": [refs[(chunk, "serialization")], _ref("ErrorResponse")]}
            ok["text/event-stream"] = {"schema": {
                "description": "Server-sent events: one per chunk of the answer (an error after the stream began "
                               "comes as one event with the error object), then `data: [DONE]`",
                "type": "object",
                "properties": {"event": {"type": "string"}, "data": {
                    "type": "string", "if": {"const": "[DONE]"},
                    "else": {"contentMediaType": "application/json", "contentSchema": data}}},
                "required": ["data"]}}
        responses = {"200": {"description": "The answer", "content": ok}}
        for status, description in ERRORS.items():
            responses[status] = {"description": description, "content": error}
        responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                       "description": "Seconds to wait"}}
        out[path] = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": refs[(req, "validation")]}}}, "responses": responses}
    return out


def describe_request_bodies(app: FastAPI) -> None:
    """Make `app.openapi()` (and so /openapi.json and /docs) describe the bodies of the POST endpoints in ENDPOINTS.
    Call once, after the routes are added."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()  # FastAPI's document, cached by FastAPI in app.openapi_schema: completed in place
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for path, bodies in _operation_bodies(components).items():
                if path in doc.get("paths", {}) and "post" in doc["paths"][path]:
                    doc["paths"][path]["post"].update(bodies)
        return app.openapi_schema

    app.openapi = openapi
