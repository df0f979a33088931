"""MLCEngine (sync) and AsyncMLCEngine: OpenAI's chat.completions / completions over one EngineCore thread.

Both engines share `_EngineBase` (model loading, request validation, prompt building); they differ only in how results
travel back: a queue.Queue for the sync engine (safe from many threads, which are still batched together), an
asyncio.Queue fed with call_soon_threadsafe for the async one.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import queue
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional, Union

import numpy as np
from pydantic import ValidationError

from .. import __version__
from ..conversation import DEFAULT_TOOL_FORMATS, JINJA, Conversation
from ..tokenizer import Tokenizer
from . import protocol as P
from . import tools as T
from .config import EngineConfig, resolve, resolve_embedding
from .embedding import EmbeddingCore, EmbeddingJob
from .grammar import Grammar, GrammarBackend, response_format_grammar
from .request import Delta, Done, GenerationConfig, Request
from .runner import ModelRunner
from .sampler import SamplingParams
from .scheduler import EngineCore


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import tvm

    return "cuda" if tvm.cuda(0).exist else "cpu"


def _resolve_model_dir(model: str) -> Path:
    if model.startswith(("HF://", "hf://")):
        from ..loader.locate import _resolve_hf

        return _resolve_hf(model[5:])
    path = Path(model).expanduser()
    if not (path / "mlc-chat-config.json").exists():
        raise FileNotFoundError(f"'{model}' is not a model folder (no mlc-chat-config.json); build it with "
                                "`mlc_llm build` or `mlc_llm gen_config` + `convert_weight`")
    return path


logger = logging.getLogger("mlc_llm.serve")
_DEBUG_FIELDS_LOGGED: set[str] = set()  # debug_config fields without effect, each logged once


class _EngineBase:
    # seconds a request may take, queue included, before the engine ends it with RequestTimeout (None: no limit)
    request_timeout: Optional[float] = None

    def __init__(self, model: str, model_lib: Optional[str] = None, device: str = "auto", mode: str = "local",
                 engine_config: Optional[EngineConfig] = None, overrides: Optional[str] = None):
        self.model = model
        self.model_dir = _resolve_model_dir(model)
        self.device = _resolve_device(device)
        self.chat_config = json.loads((self.model_dir / "mlc-chat-config.json").read_text(encoding="utf-8"))
        if model_lib is None:
            from .jit import jit_library

            model_lib = str(jit_library(self.model_dir, self.chat_config, self.device))
        cfg = engine_config or EngineConfig(mode=mode)
        if engine_config is not None and mode != "local" and engine_config.mode != mode:
            raise ValueError(f"mode='{mode}' and engine_config.mode='{engine_config.mode}' disagree")
        cfg = cfg.with_overrides(overrides)
        self.runner = ModelRunner(self.model_dir, model_lib, self.device)
        self.task = self.runner.task
        self.tokenizer = Tokenizer(self.model_dir)
        self.fingerprint = f"mlc-{__version__}-{self.chat_config['quantization']}-{self.device}"
        self._terminated = False
        self.chat = _Chat(self)
        self.completions = _Endpoint(self, "completion")
        self.embeddings = _Endpoint(self, "embedding")
        if self.task == "embedding":
            self.config = resolve_embedding(cfg, self.runner.metadata)
            normalize = bool((self.chat_config.get("embedding_metadata") or {}).get("normalize", False))
            self.core = EmbeddingCore(self.runner, self.config, normalize)
        else:
            self._init_chat(cfg, model_lib)
        self._thread = threading.Thread(target=self.core.run_forever, name="mlc-engine", daemon=True)
        self._thread.start()

    def _init_chat(self, cfg: EngineConfig, model_lib: str) -> None:
        self.config = resolve(cfg, self.runner.metadata, self.device.split(":")[0])
        if self.config.sampler == "device" and not self.runner.has_device_sampler:
            if cfg.sampler == "device":
                raise ValueError(f"sampler=device: the model library '{model_lib}' has no sampling functions "
                                 "(compiled by an older version): recompile it with `mlc_llm compile`")
            self.config = dataclasses.replace(self.config, sampler="host")
        conv = self.chat_config.get("conv_template")
        self.conv = Conversation.from_dict(conv) if conv and conv.get("name") != JINJA else None
        eos = self.chat_config.get("eos_token_id")
        self.stop_token_ids = sorted(set((self.conv.stop_token_ids if self.conv else []) +
                                         ([eos] if isinstance(eos, int) else list(eos or []))))
        self.grammars = GrammarBackend(self.model_dir, self.runner.vocab_size, self.stop_token_ids)
        runner = self.runner
        if self.config.speculative_mode == "small_draft":
            runner = self._draft_pair(self.config.draft_model)
        self.core = EngineCore(runner, self.config)

    def _draft_pair(self, spec: str):
        """The model + the draft model of speculative_mode small_draft ("DIR" or "DIR,LIB")."""
        from .draft import DraftPair

        draft_path, _, draft_lib = spec.partition(",")
        draft_dir = _resolve_model_dir(draft_path)
        if not draft_lib:
            from .jit import jit_library

            chat_config = json.loads((draft_dir / "mlc-chat-config.json").read_text(encoding="utf-8"))
            draft_lib = str(jit_library(draft_dir, chat_config, self.device))
        draft = ModelRunner(draft_dir, draft_lib, self.device)
        limit = int(draft.metadata["max_batch_size"])
        if self.config.max_num_sequence > limit:
            raise ValueError(f"max_num_sequence {self.config.max_num_sequence} exceeds the draft library's "
                             f"compile-time max_batch_size {limit}")
        if self.config.prefill_chunk_size > int(draft.metadata["prefill_chunk_size"]):
            raise ValueError(f"prefill_chunk_size {self.config.prefill_chunk_size} exceeds the draft library's "
                             f"compile-time prefill_chunk_size {draft.metadata['prefill_chunk_size']}")
        return DraftPair(self.runner, draft)

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request's `model` field may use: the name it was opened with, or its folder's name or path."""
        return (self.model, self.model_dir.name, str(self.model_dir))

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def terminate(self) -> None:
        if not self._terminated:
            self._terminated = True
            self.core.stop()
            self._thread.join(timeout=30)

    def metrics(self) -> dict[str, Any]:
        return self.core.metrics()

    def reset_prefix_cache(self) -> None:
        """Drop the KV of every cached (finished) sequence (vLLM's name); running requests keep theirs."""
        if self.task == "embedding" or self._terminated:
            return
        if not self.core.request_prefix_cache_reset().wait(60):
            raise RuntimeError("the engine did not reset its prefix cache within 60 s")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.terminate()

    # ---- request preparation --------------------------------------------------------------------------------------
    def _parse(self, cls, kwargs: dict[str, Any]):
        try:
            req = cls(**kwargs)
        except ValidationError as e:
            raise P.BadRequestError(P.explain_validation_error(e)) from None
        if req.model is not None and req.model not in self.model_names:
            raise P.ModelNotFoundError(f"model '{req.model}' is not served here (served: {self.model})")
        debug = getattr(req, "debug_config", None)
        if debug is not None:
            for name in debug.model_fields_set - {"ignore_eos"}:
                if name not in _DEBUG_FIELDS_LOGGED:
                    _DEBUG_FIELDS_LOGGED.add(name)
                    logger.info("debug_config.%s is accepted and has no effect in this engine", name)
        return req

    # No tokenizer packs more characters than this into a token on average: longer input cannot fit the context
    # and is refused before minutes of tokenizing (a 16 MB body is 16 million characters).
    MAX_CHARS_PER_TOKEN = 32

    def _check_size(self, chars: int) -> None:
        limit = self.MAX_CHARS_PER_TOKEN * self.config.max_single_sequence_length
        if chars > limit:
            raise P.ContextLengthError(f"the input has {chars} characters, more than a context window of "
                                       f"{self.config.max_single_sequence_length} tokens can hold")

    def _chat_prompt(self, req: P.ChatCompletionRequest) -> tuple[list[int], Optional[Grammar], Optional[str]]:
        """-> (prompt tokens, grammar or None, tool format when the answer may contain tool calls)."""
        self._check_size(sum(len(m.text()) for m in req.messages))
        fmt = self.conv.effective_tool_format if self.conv else DEFAULT_TOOL_FORMATS[JINJA]
        tools = T.parse_tools(req.tools) if req.tools is not None else None
        if tools is None and req.tool_choice not in (None, "none"):
            raise P.BadRequestError("tool_choice needs tools")
        mode, forced = T.parse_tool_choice(req.tool_choice, tools) if tools else ("none", None)
        if mode != "none" and req.response_format is not None and req.response_format.type != "text":
            raise P.BadRequestError("response_format and tools cannot be combined; use tool_choice='none' or drop "
                                    "response_format")
        messages, call_ids = [], set()
        for i, m in enumerate(req.messages):
            where = f"messages[{i}]"
            content = m.text()
            if m.tool_calls is not None and m.role != "assistant":
                raise P.BadRequestError(f"{where}: only assistant messages carry tool_calls")
            if m.tool_call_id is not None and m.role != "tool":
                raise P.BadRequestError(f"{where}: only tool messages carry tool_call_id")
            if m.role == "assistant" and m.tool_calls:
                calls = T.parse_history_calls(m.tool_calls, where)
                call_ids = {c[0] for c in calls}
                content = (content + "\n" if content else "") + T.render_calls(fmt, calls)
            elif m.role == "tool":
                if not m.tool_call_id:
                    raise P.BadRequestError(f"{where}: a tool message needs tool_call_id")
                if m.tool_call_id not in call_ids:
                    raise P.BadRequestError(f"{where}: tool_call_id '{m.tool_call_id}' does not answer a tool call "
                                            "of the assistant message before it")
                content = T.render_result(fmt, content)
            elif m.role != "assistant" and not content.strip():
                raise P.BadRequestError(f"{where}: content of a {m.role} message must not be empty")
            if m.role != "tool" and not (m.role == "assistant" and m.tool_calls):
                call_ids = set()  # a tool result answers the tool calls of the assistant turn just before it
            messages.append({"role": m.role, "content": content})
        if mode != "none":
            instructions = T.system_prompt(fmt, tools)
            grammar = self.grammars.compile(T.tool_grammar(fmt, tools, mode, forced, req.parallel_tool_calls,
                                                         self.grammars.single_tokens(T.TAGS.get(fmt, ()))), "tools")
        else:
            grammar, instructions = response_format_grammar(self.grammars, req.response_format)
        if instructions:  # appended to the system message (the template's default one when there is none)
            if messages[0]["role"] == "system":
                messages[0]["content"] += "\n\n" + instructions
            else:
                default = self.conv.system_message if self.conv else ""
                messages.insert(0, {"role": "system", "content": (default + "\n\n" if default else "") + instructions})
        if self.conv is not None:
            def render(msgs):
                try:
                    return self.conv.as_prompt(msgs)
                except ValueError as e:
                    raise P.BadRequestError(str(e)) from None

            prompt = list(self.conv.system_prefix_token_ids or []) + self._encode_chat(render, messages)
        else:
            prompt = self._encode_chat(self._render_jinja, messages)
        return prompt, grammar, (fmt if mode != "none" else None)

    def _encode_chat(self, render, messages: list[dict[str, str]]) -> list[int]:
        """The rendered conversation -> token ids, with message content tokenized as text: only the template's own
        markers are control tokens, so "<|im_end|>" typed by a user cannot close its turn or open a fake one.
        Content is found by rendering with placeholders; a template that rewrites content (strip, replace) and
        gets control-token strings in it is refused."""
        text = render(messages)
        specials = self.tokenizer.special_strings
        if not any(s in (m["content"] or "") for m in messages for s in specials):
            return self.tokenizer.encode(text)  # the common case: nothing to escape, one pass as before
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        pieces = re.split("(\ue000\\d+\ue001)", render([{**m, "content": marks[i]} for i, m in enumerate(messages)]))
        content = {marks[i]: m["content"] or "" for i, m in enumerate(messages)}
        if "".join(content.get(p, p) for p in pieces) != text:
            found = next(s for s in specials if any(s in c for c in content.values()))
            raise P.BadRequestError(f"a message contains the control-token string {found!r} and this model's chat "
                                    "template rewrites message text, so it cannot be kept as plain text: remove it")
        ids: list[int] = []
        for p in pieces:
            if p in content:
                ids += self.tokenizer.encode_text(content[p])
            elif p:
                ids += self.tokenizer.encode(p)
        return ids

    def _render_jinja(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.render_chat(messages, P.BadRequestError)

    def _generation(self, req: P.SamplingFields, prompt: list[int], max_tokens: Optional[int], logprobs: bool,
                    top_logprobs: int) -> GenerationConfig:
        ctx = self.config.max_single_sequence_length
        if len(prompt) >= ctx:
            raise P.ContextLengthError(f"the prompt has {len(prompt)} tokens, more than the context window allows "
                                    f"({ctx} tokens including the answer)")
        if len(prompt) > self.config.max_total_sequence_length:
            raise P.ContextLengthError(f"the prompt has {len(prompt)} tokens, more than the KV cache holds "
                                    f"({self.config.max_total_sequence_length})")
        if max_tokens is None:
            max_tokens = ctx - len(prompt)
        elif len(prompt) + max_tokens > ctx:
            raise P.ContextLengthError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                    f"window ({ctx} tokens)")
        vocab = self.runner.vocab_size
        for t in req.logit_bias or {}:
            if t >= vocab:
                raise P.BadRequestError(f"logit_bias: token id {t} is out of range [0, {vocab})")
        defaults = self.chat_config
        temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
        top_p = req.top_p if req.top_p is not None else defaults.get("top_p", 1.0)
        sampling = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=req.top_k, min_p=req.min_p,
            frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
            repetition_penalty=req.repetition_penalty, logit_bias=dict(req.logit_bias or {}),
            logprobs=logprobs, top_logprobs=top_logprobs)
        stop = list(req.stop or []) + (list(self.conv.stop_str) if self.conv else [])
        return GenerationConfig(sampling=sampling, n=req.n, max_tokens=max_tokens, stop=stop,
                                stop_token_ids=self.stop_token_ids, ignore_eos=req.ignores_eos, seed=req.seed)

    def _require_chat(self) -> None:
        if self.task != "chat":
            raise P.BadRequestError(f"model '{self.model}' is an embedding model: it serves embeddings "
                                    "(/v1/embeddings, engine.embeddings.create), not chat or completions")

    def _prepare_chat(self, kwargs) -> tuple[P.ChatCompletionRequest, list[int], GenerationConfig, Optional[str]]:
        self._require_chat()
        req = self._parse(P.ChatCompletionRequest, kwargs)
        prompt, grammar, tool_format = self._chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        gen = self._generation(req, prompt, max_tokens, req.logprobs, req.top_logprobs or 0)
        gen.grammar = grammar
        return req, prompt, gen, tool_format

    def _prepare_completion(self, kwargs) -> tuple[P.CompletionRequest, list[int], GenerationConfig, None]:
        self._require_chat()
        req = self._parse(P.CompletionRequest, kwargs)
        self._check_size(len(req.prompt))
        if isinstance(req.prompt, str):
            prompt = self.tokenizer.encode_prompt(req.prompt)
        else:
            prompt = list(req.prompt)
            bad = [t for t in prompt if not 0 <= t < self.runner.vocab_size]
            if bad:
                raise P.BadRequestError(f"prompt token id {bad[0]} is out of range [0, {self.runner.vocab_size})")
        n_lp = req.logprobs or 0
        gen = self._generation(req, prompt, req.max_tokens if req.max_tokens is not None else 16,
                               req.logprobs is not None, n_lp)
        gen.grammar, _ = response_format_grammar(self.grammars, req.response_format)
        return req, prompt, gen, None

    def _new_request(self, prompt: list[int], gen: GenerationConfig, sink) -> Request:
        req = Request(uuid.uuid4().hex, prompt, gen, self.tokenizer, sink)
        if self.request_timeout is not None:
            req.deadline = req.arrival + self.request_timeout
        return req

    # ---- embeddings -----------------------------------------------------------------------------------------------
    def _prepare_embedding(self, kwargs) -> tuple[P.EmbeddingRequest, list[list[int]]]:
        if self.task != "embedding":
            raise P.BadRequestError(f"model '{self.model}' is a chat model: it has no embeddings (serve an embedding "
                                    "model, e.g. the minilm_cpu deployment)")
        req = self._parse(P.EmbeddingRequest, kwargs)
        hidden = self.runner.hidden_size
        if req.dimensions is not None and req.dimensions > hidden:
            raise P.BadRequestError(f"dimensions must be at most {hidden} for this model, got {req.dimensions}")
        limit = self.config.max_single_sequence_length
        inputs = []
        for i, item in enumerate(req.inputs):
            if isinstance(item, str):
                self._check_size(len(item))
                ids = self.tokenizer.encode_input(item)
            else:
                ids = list(item)
                bad = [t for t in ids if not 0 <= t < self.runner.vocab_size]
                if bad:
                    raise P.BadRequestError(f"input {i}: token id {bad[0]} is out of range "
                                            f"[0, {self.runner.vocab_size})")
            if len(ids) > limit:
                raise P.ContextLengthError(f"input {i} has {len(ids)} tokens, more than this model's limit of "
                                           f"{limit}")
            inputs.append(ids)
        return req, inputs

    def _embedding_response(self, req: P.EmbeddingRequest, inputs: list[list[int]], result) -> P.EmbeddingResponse:
        if isinstance(result, BaseException):
            raise result
        vectors = result
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:  # truncated, then unit length again
            vectors = vectors[:, :req.dimensions]
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if req.encoding_format == "base64":  # little-endian float32, as OpenAI's
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            data = [v.tolist() for v in vectors]
        tokens = sum(len(i) for i in inputs)
        return P.EmbeddingResponse(data=[P.Embedding(index=i, embedding=d) for i, d in enumerate(data)],
                                   model=self.model, usage=P.EmbeddingUsage(prompt_tokens=tokens,
                                                                             total_tokens=tokens))


class _Endpoint:
    """`create(**kwargs)` of one OpenAI endpoint: the engine's `_run` (a coroutine for AsyncMLCEngine, so
    `await engine.chat.completions.create(...)` works there)."""

    def __init__(self, engine: "_EngineBase", kind: str):
        self._engine, self._kind = engine, kind

    def create(self, /, **kwargs):  # positional-only: a request field named "self" is a field (and refused)
        return self._engine._run(self._kind, kwargs)


class _Chat:
    def __init__(self, engine: "_EngineBase"):
        self.completions = _Endpoint(engine, "chat")


# ---- turning engine events into OpenAI objects ------------------------------------------------------------------
def _chat_logprobs(delta: Delta, tok: Tokenizer) -> Optional[P.ChatLogprobs]:
    if not delta.logprobs:
        return None
    content = []
    for sample, text in delta.logprobs:
        top = [P.TopLogprob(token=tok.token_text(t), logprob=lp, bytes=list(tok.token_text(t).encode()))
               for t, lp in (sample.top or [])]
        content.append(P.LogprobsContent(token=text, logprob=sample.logprob, bytes=list(text.encode()),
                                         top_logprobs=top))
    return P.ChatLogprobs(content=content)


class _Collector:
    """Accumulates deltas into whole choices (non-stream responses)."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.finish: list[Optional[str]] = [None] * n
        self.logprobs: list[list] = [[] for _ in range(n)]

    def add(self, d: Delta) -> None:
        self.text[d.index] += d.text
        self.logprobs[d.index].extend(d.logprobs)
        if d.finish_reason:
            self.finish[d.index] = d.finish_reason


def _finish_reason(reason: Optional[str], stream: Optional[T.ToolStream]) -> Optional[str]:
    return "tool_calls" if reason == "stop" and stream is not None and stream.called else reason


class _Formatter:
    def __init__(self, engine: _EngineBase, kind: str, req, n: int, tool_format: Optional[str] = None):
        self.engine, self.kind, self.req, self.n = engine, kind, req, n
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = req.model or engine.model
        self.tool_format = tool_format
        # completions: `echo` puts the prompt before each choice's text, `suffix` comes after it
        self.echo = ""
        if kind != "chat" and req.echo:
            self.echo = req.prompt if isinstance(req.prompt, str) else engine.tokenizer.decode(list(req.prompt))
        self.suffix = (req.suffix or "") if kind != "chat" else ""
        self.started = False
        # per choice: splits the streamed text into content and tool-call deltas
        self.tool_streams = [T.ToolStream(tool_format) for _ in range(n)] if tool_format else None

    def chunk(self, d: Delta):
        """One engine delta -> a stream chunk, or None when there is nothing to send yet."""
        tok = self.engine.tokenizer
        if self.kind == "chat":
            content, calls, finish = d.text, None, d.finish_reason
            if self.tool_streams is not None:
                stream = self.tool_streams[d.index]
                content, new_calls = stream.feed(d.text, final=d.finish_reason is not None)
                calls = [P.DeltaToolCall(index=c.index, id=c.id, type="function" if c.id else None,
                                         function=P.DeltaFunctionCall(name=c.name, arguments=c.arguments))
                         for c in new_calls] or None
                finish = _finish_reason(d.finish_reason, stream)
            if not content and not calls and not finish and not d.logprobs:
                return None
            return P.ChatCompletionStreamResponse(
                id=self.id, created=self.created, model=self.model, system_fingerprint=self.engine.fingerprint,
                choices=[P.ChatCompletionStreamResponseChoice(
                    index=d.index, delta=P.DeltaMessage(role="assistant", content=content if content or not calls
                                                        else None, tool_calls=calls),
                    finish_reason=finish, logprobs=_chat_logprobs(d, tok))])
        if not d.text and not d.finish_reason and not d.logprobs:
            return None
        return P.CompletionResponse(
            id=self.id, created=self.created, model=self.model, system_fingerprint=self.engine.fingerprint,
            choices=[P.CompletionResponseChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                                                logprobs=_completion_logprobs(d.logprobs, tok, 0))])

    def _texts(self, text: str):
        return P.CompletionResponse(
            id=self.id, created=self.created, model=self.model, system_fingerprint=self.engine.fingerprint,
            choices=[P.CompletionResponseChoice(index=i, text=text) for i in range(self.n)])

    def first_chunks(self) -> list[Any]:
        """Sent before the first token: the echoed prompt, one choice each."""
        return [self._texts(self.echo)] if self.echo else []

    def last_chunks(self) -> list[Any]:
        """Sent after the last token (before usage): the suffix."""
        return [self._texts(self.suffix)] if self.suffix else []

    def usage_chunk(self, usage: dict[str, Any]):
        cls = P.ChatCompletionStreamResponse if self.kind == "chat" else P.CompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, system_fingerprint=self.engine.fingerprint,
                   choices=[], usage=P.CompletionUsage(**usage))

    def whole(self, c: _Collector, usage: dict[str, Any]):
        tok = self.engine.tokenizer
        u = P.CompletionUsage(**usage)
        if self.kind == "chat":
            choices = []
            for i in range(self.n):
                message, stream = P.ChatCompletionMessage(content=c.text[i]), None
                if self.tool_format:
                    stream = T.ToolStream(self.tool_format)
                    content, calls = stream.feed(c.text[i], final=True)
                    message = P.ChatCompletionMessage(
                        content=content if content.strip() or not calls else None,
                        tool_calls=[P.ToolCall(id=k.id, function=P.FunctionCall(name=k.name, arguments=k.arguments))
                                    for k in calls] or None)
                choices.append(P.ChatCompletionResponseChoice(
                    index=i, message=message, finish_reason=_finish_reason(c.finish[i], stream),
                    logprobs=_chat_logprobs(Delta(i, "", c.logprobs[i]), tok) if self.req.logprobs else None))
            return P.ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                            system_fingerprint=self.engine.fingerprint, choices=choices, usage=u)
        choices = [P.CompletionResponseChoice(index=i, text=self.echo + c.text[i] + self.suffix,
                                              finish_reason=c.finish[i],
                                              logprobs=_completion_logprobs(c.logprobs[i], tok, len(self.echo))
                                              if self.req.logprobs is not None else None) for i in range(self.n)]
        return P.CompletionResponse(id=self.id, created=self.created, model=self.model,
                                    system_fingerprint=self.engine.fingerprint, choices=choices, usage=u)


def _completion_logprobs(entries, tok: Tokenizer, offset: int) -> Optional[P.CompletionLogprobs]:
    if not entries:
        return None
    out = P.CompletionLogprobs()
    for sample, text in entries:
        out.tokens.append(text)
        out.token_logprobs.append(sample.logprob)
        out.top_logprobs.append({tok.token_text(t): lp for t, lp in (sample.top or [])})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _stream_items(ev, fmt: _Formatter, include_usage: bool) -> tuple[list[Any], bool]:
    """One engine event of a streamed request -> (chunks to yield, finished). Raises the engine's error."""
    first = [] if fmt.started else fmt.first_chunks()
    fmt.started = True
    if isinstance(ev, Delta):
        chunk = fmt.chunk(ev)
        return first + ([chunk] if chunk is not None else []), False
    if isinstance(ev, Done):
        return first + fmt.last_chunks() + ([fmt.usage_chunk(ev.usage)] if include_usage else []), True
    raise ev.error


def _collect(ev, collected: _Collector, fmt: _Formatter) -> Optional[Any]:
    """One engine event of a non-stream request -> the whole response once done, else None."""
    if isinstance(ev, Delta):
        collected.add(ev)
        return None
    if isinstance(ev, Done):
        return fmt.whole(collected, ev.usage)
    raise ev.error


# ---- sync engine ------------------------------------------------------------------------------------------------
class MLCEngine(_EngineBase):
    """from mlc_llm import MLCEngine; engine = MLCEngine(model_dir, model_lib=...)"""

    def _run(self, kind: str, kwargs: dict[str, Any]) -> Union[Any, Iterator[Any]]:
        if kind == "embedding":
            req, inputs = self._prepare_embedding(kwargs)
            if self._terminated:
                raise RuntimeError("the engine was terminated")
            box: queue.Queue = queue.Queue()
            self.core.submit(EmbeddingJob(uuid.uuid4().hex, inputs, box.put))
            return self._embedding_response(req, inputs, box.get())
        req, prompt, gen, tool_format = (self._prepare_chat if kind == "chat" else self._prepare_completion)(kwargs)
        if self._terminated:
            raise RuntimeError("the engine was terminated")
        events: queue.Queue = queue.Queue()
        request = self._new_request(prompt, gen, events.put)
        fmt = _Formatter(self, kind, req, gen.n, tool_format)
        if req.stream:  # submitted when the consumer starts reading: a stream never read never runs
            return self._stream(request, events, fmt, bool(req.stream_options and req.stream_options.include_usage))
        self.core.submit(request)
        collected = _Collector(gen.n)
        while (response := _collect(events.get(), collected, fmt)) is None:
            pass
        return response

    def _stream(self, request: Request, events: queue.Queue, fmt: _Formatter, include_usage: bool) -> Iterator[Any]:
        if self._terminated:
            raise RuntimeError("the engine was terminated")
        self.core.submit(request)
        done = False
        try:
            while not done:
                try:
                    items, done = _stream_items(events.get(), fmt, include_usage)
                except Exception:
                    done = True  # an engine error: the engine already ended the request
                    raise
                yield from items
        finally:
            if not done:  # the consumer stopped early: free the request's KV now
                self.core.abort(request.id)


# ---- async engine -----------------------------------------------------------------------------------------------
class AsyncMLCEngine(_EngineBase):
    """async for chunk in await engine.chat.completions.create(..., stream=True)"""

    async def _run(self, kind: str, kwargs: dict[str, Any]):
        if kind == "embedding":
            return await self._embed(kwargs)
        # validating, rendering, tokenizing and compiling a grammar take a while for big requests: off the event loop
        prepare = self._prepare_chat if kind == "chat" else self._prepare_completion
        req, prompt, gen, tool_format = await asyncio.to_thread(prepare, kwargs)
        if self._terminated:
            raise RuntimeError("the engine was terminated")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = self._new_request(prompt, gen, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        fmt = _Formatter(self, kind, req, gen.n, tool_format)
        if req.stream:  # submitted when the consumer starts reading: a stream never read never runs
            return self._stream(request, events, fmt, bool(req.stream_options and req.stream_options.include_usage))
        self.core.submit(request)
        collected = _Collector(gen.n)
        try:
            while (response := _collect(await events.get(), collected, fmt)) is None:
                pass
            return response
        except asyncio.CancelledError:
            self.core.abort(request.id)
            raise

    async def _embed(self, kwargs: dict[str, Any]) -> P.EmbeddingResponse:
        req, inputs = await asyncio.to_thread(self._prepare_embedding, kwargs)
        if self._terminated:
            raise RuntimeError("the engine was terminated")
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()
        job = EmbeddingJob(uuid.uuid4().hex, inputs,
                           lambda r: loop.call_soon_threadsafe(lambda: result.done() or result.set_result(r)))
        self.core.submit(job)
        try:
            vectors = await result
        except asyncio.CancelledError:
            self.core.abort(job.id)
            raise
        return await asyncio.to_thread(self._embedding_response, req, inputs, vectors)

    async def _stream(self, request: Request, events: asyncio.Queue, fmt: _Formatter,
                      include_usage: bool) -> AsyncIterator[Any]:
        if self._terminated:
            raise RuntimeError("the engine was terminated")
        self.core.submit(request)
        done = False
        try:
            while not done:
                try:
                    items, done = _stream_items(await events.get(), fmt, include_usage)
                except Exception:
                    done = True  # an engine error: the engine already ended the request
                    raise
                for item in items:
                    yield item
        finally:
            if not done:
                self.core.abort(request.id)
