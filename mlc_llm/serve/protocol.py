"""OpenAI-compatible request and response objects (pydantic), shared by the Python engine and the REST server."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class BadRequestError(ValueError):
    """A request that cannot be served as asked; the message says what to change. HTTP 400."""
    code: Optional[str] = None
    param: Optional[str] = None


class ModelNotFoundError(BadRequestError):
    """The request names a model this engine does not serve. HTTP 404."""
    code = "model_not_found"
    param = "model"


class ContextLengthError(BadRequestError):
    """Prompt (+ max_tokens) does not fit the context window or the KV cache. HTTP 400."""
    code = "context_length_exceeded"


# Deeper JSON than this is refused: parsers, schema checkers and grammar compilers recurse on it.
MAX_JSON_DEPTH = 64


def check_json_value(value: Any, where: str) -> None:
    """A 400 for a JSON value nested deeper than MAX_JSON_DEPTH or holding a string that is not valid Unicode (a lone
    surrogate from a "\\ud800" escape); checked without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequestError(f"{where}: a string holds a lone surrogate (\\ud800-\\udfff escapes must come "
                                      "in pairs)") from None
        elif isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BadRequestError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)


def parse_json(text: str | bytes, where: str) -> Any:
    """json.loads with every way it fails (bad syntax, 10,000 levels of nesting, a 5,000-digit number) as a 400."""
    import json

    try:
        value = json.loads(text)
    except RecursionError:
        raise BadRequestError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or the int conversion limit
        raise BadRequestError(f"{where} is not valid JSON: {e}") from None
    check_json_value(value, where)
    return value


def explain_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) > 1)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


# ---- requests -----------------------------------------------------------------------------------------------------
class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's {"type": "json_object"} / {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}, and
    MLC LLM's {"type": "json_object", "schema": {...} or "<JSON text>"}."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: Optional[dict[str, Any]] = None
    schema_: Optional[Union[dict[str, Any], str]] = Field(default=None, alias="schema")


class DebugConfig(BaseModel):
    """MLC LLM's per-request `debug_config`. `ignore_eos` is honoured; the other fields are accepted (clients of the
    original send them) and have no effect here."""
    model_config = ConfigDict(extra="allow")
    ignore_eos: bool = False
    pinned_system_prompt: bool = False
    special_request: Optional[str] = None
    grammar_execution_mode: Optional[str] = None


class SamplingFields(BaseModel):
    """Generation settings common to chat and completions (OpenAI names plus vLLM-style extras)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    model: Optional[str] = None
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    logit_bias: Optional[dict[int, float]] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=128)
    seed: Optional[int] = Field(None, ge=0, le=2**64 - 1)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    ignore_eos: bool = False
    user: Optional[str] = None
    debug_config: Optional[DebugConfig] = None

    @property
    def ignores_eos(self) -> bool:
        return self.ignore_eos or bool(self.debug_config and self.debug_config.ignore_eos)

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v):
        for token, bias in (v or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {token} must be in [-100, 100], got {bias}")
            if token < 0:
                raise ValueError(f"token id {token} is negative")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return stops


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check(self):
        if not self.messages:
            raise ValueError("messages must not be empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int]]
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if (isinstance(v, str) and not v) or (isinstance(v, list) and not v):
            raise ValueError("prompt must not be empty")
        return v


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs per request


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: one text, a list of texts, one token-id list or a list of them."""
    model_config = ConfigDict(extra="forbid")
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _inputs(cls, v):
        items = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else list(v)
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}")
        for i, item in enumerate(items):
            if not item:
                raise ValueError(f"input {i} is empty")
        return items

    @property
    def inputs(self) -> list[Union[str, list[int]]]:
        return self.input  # normalised to a list by the validator


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---- responses ----------------------------------------------------------------------------------------------------
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class LogprobsContent(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[LogprobsContent] = []


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    extra: Optional[dict[str, Any]] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChatLogprobs] = None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionResponseChoice]
    usage: CompletionUsage


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    """The first delta of a call has id, type and function.name; later ones append to function.arguments."""
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatCompletionStreamResponseChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChatLogprobs] = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatCompletionStreamResponseChoice]
    usage: Optional[CompletionUsage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[str] = None
    logprobs: Optional[CompletionLogprobs] = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[CompletionResponseChoice]
    usage: Optional[CompletionUsage] = None
