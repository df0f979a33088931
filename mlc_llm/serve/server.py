"""The OpenAI-compatible REST server: FastAPI over one AsyncMLCEngine.

    GET  /v1/models            the served model
    POST /v1/chat/completions  stream (SSE, one event per token chunk, then `data: [DONE]`) or not
    POST /v1/completions
    GET  /health               503 while the model loads (or failed to), 200 when ready
    GET  /metrics              Prometheus text
    GET  /docs                 Swagger UI
    GET  /                     the chat page (static files under ui/; off with --no-ui)

The engine loads in a background thread after the socket is open, so /health answers at once. Errors always come back
as OpenAI's `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status, streamed requests included: a
request is validated (and its prompt built) before the first byte of the stream is sent. A client that disconnects
aborts its request, which frees its KV pages in the engine's next iteration.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from . import protocol as P
from .openapi import describe_request_bodies
from .request import RequestTimeout

logger = logging.getLogger("mlc_llm.serve")

MAX_BODY_BYTES = 16 * 1024 * 1024
UI_DIR = Path(__file__).with_name("ui")
# The page loads only its own files and talks only to this server; a second guard (after the renderer that never
# parses model output as HTML) against a script getting into the page.
UI_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                         "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                         "base-uri 'none'; frame-ancestors 'none'",
              "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@dataclass
class ServerSettings:
    api_key: Optional[str] = None
    allow_credentials: bool = False
    allowed_origins: list[str] = field(default_factory=list)  # none: no web page of another origin may call us
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    ui: bool = True  # the chat page at /
    strict_model_name: bool = False  # True: a request naming another model gets 404 (else the served model answers)
    allowed_hosts: Optional[list[str]] = None  # Host header values accepted (None: any); "*" matches any
    # requests waiting for a sequence slot before new ones get 429 (None: 8 per slot of the engine)
    max_queued_requests: Optional[int] = None
    shutdown_timeout: float = 10.0  # SIGTERM: seconds running requests get to finish before they end with an error
    header_timeout: float = 10.0  # a connection whose request headers are not all in after this many seconds closes
    body_timeout: float = 30.0  # seconds without a byte of a request body arriving: 408
    request_timeout: Optional[float] = None  # seconds a request may run (queue included); None: no limit

    def check(self) -> None:
        for name in ("shutdown_timeout", "header_timeout", "body_timeout", "request_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name.replace('_', '-')} must be a positive number of seconds, got {value}")
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ValueError("--allow-credentials with every origin ('*') would let any web page act with the "
                             "user's credentials: list the origins in --allowed-origins")


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]


def _host_name(header: str) -> str:
    """'Host: [::1]:8000' -> '::1', 'example.com:80' -> 'example.com'."""
    if header.startswith("["):
        return header[1:header.find("]")].lower() if "]" in header else header.lower()
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


class ShuttingDown(RuntimeError):
    """The server received SIGTERM and the grace period ended before this request did."""


class ReplicaUnavailable(RuntimeError):
    """An engine replica died (or none could be reached) while it had this request (`--backend ray`)."""


class Overloaded(RuntimeError):
    """Every engine replica's queue is full (`--backend ray`); the client retries."""


# Requests the server itself ended: (HTTP status, error type, code), also the in-band error of a started stream
ENDED: dict[type, tuple[int, str, str]] = {ShuttingDown: (503, "server_error", "shutting_down"),
                                           RequestTimeout: (504, "timeout_error", "request_timeout"),
                                           ReplicaUnavailable: (503, "server_error", "replica_unavailable"),
                                           Overloaded: (429, "rate_limit_error", "queue_full")}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: HTTPError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def _from_bad_request(e: P.BadRequestError) -> HTTPError:
    status = 404 if isinstance(e, P.ModelNotFoundError) else 400
    return HTTPError(status, str(e), param=e.param, code=e.code)


# ---- Prometheus ---------------------------------------------------------------------------------------------------
class Metrics:
    """Counters and histograms fed by the engine thread at each request's end; gauges read from the engine on scrape.
    Names follow vLLM's (`vllm:` → `mlc_llm:`) so existing dashboards need only the prefix changed."""

    def __init__(self, model_name: str, replica: Optional[str] = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self.registry = CollectorRegistry()
        self.model_name = model_name
        # an engine replica of `--backend ray` labels its series with its id; the front end serves them merged
        labels = ["model_name"] + (["replica"] if replica else [])
        values = [model_name] + ([replica] if replica else [])
        self.label_values = values
        self.engine = None
        r = self.registry
        self.errors = Counter("mlc_llm:request_errors", "Requests answered with an error, by HTTP status",
                              ["model_name", "status"], registry=None if replica else r)  # where HTTP is answered
        self.success = Counter("mlc_llm:request_success",
                               "Finished choices by finish reason (one per sequence: a request with n=2 counts 2)",
                               labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("mlc_llm:prompt_tokens", "Prompt tokens of finished requests", labels,
                                     registry=r)
        self.generation_tokens = Counter("mlc_llm:generation_tokens", "Generated tokens of finished requests",
                                         labels, registry=r)
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
        self.ttft = Histogram("mlc_llm:time_to_first_token_seconds", "Time to first token", labels, buckets=lat,
                              registry=r)
        self.tpot = Histogram("mlc_llm:time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=r)
        self.e2e = Histogram("mlc_llm:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=lat, registry=r)
        self._engine_side = [self.success, self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e]
        for metric in self._engine_side[1:]:
            metric.labels(*values)  # exported as 0 from the start, not only after the first request

        metrics = self

        class _Gauges:
            def collect(self):
                eng = metrics.engine
                if eng is None:
                    return
                m = eng.metrics()
                for name, doc, value in (
                        ("mlc_llm:num_requests_running", "Requests being generated", m["num_running"]),
                        ("mlc_llm:num_requests_waiting", "Requests queued", m["num_waiting"]),
                        ("mlc_llm:kv_cache_usage_perc", "Share of KV-cache pages in use (0-1)",
                         1 - m["kv_pages_free"] / m["kv_pages_total"] if m["kv_pages_total"] else 0.0),
                        ("mlc_llm:num_preemptions", "Preemptions so far", m["preemptions"]),
                        ("mlc_llm:prefix_cache_sequences", "Finished sequences whose KV the prefix cache keeps",
                         m.get("prefix_cache_sequences", 0)),
                        ("mlc_llm:prefix_cache_hit_rate", "Share of admitted prompt tokens found in the prefix cache",
                         m.get("prefix_cache_hit_rate", 0.0)),
                        ("mlc_llm:spec_accept_rate", "Share of speculative draft tokens accepted",
                         m.get("spec_accept_rate", 0.0)),
                        ("mlc_llm:spec_accept_len", "Tokens a sequence gains per speculative verify step",
                         m.get("spec_accept_len", 0.0))):
                    g = GaugeMetricFamily(name, doc, labels=labels)
                    g.add_metric(values, value)
                    yield g
                # MLC LLM's engine metrics, with its names under our prefix
                for name, doc, value, kind in (
                        ("engine_prefill_time_sum", "Seconds spent in prefill", m["prefill_time_s"], "counter"),
                        ("engine_decode_time_sum", "Seconds spent in decode steps", m["decode_time_s"], "counter"),
                        ("prefill_tokens_sum", "Prompt tokens prefilled", m["prefill_tokens"], "counter"),
                        ("decode_tokens_sum", "Tokens decoded", m["decode_tokens"], "counter"),
                        ("prefix_cache_hit_tokens_sum", "Prompt tokens whose KV came from the prefix cache",
                         m.get("prefix_cache_hit_tokens", 0), "counter"),
                        ("spec_draft_tokens_sum", "Speculative draft tokens proposed", m.get("spec_draft_tokens", 0),
                         "counter"),
                        ("spec_accepted_tokens_sum", "Speculative draft tokens accepted",
                         m.get("spec_accepted_tokens", 0), "counter"),
                        ("spec_verify_steps_sum", "Sequence steps that verified speculative drafts",
                         m.get("spec_verify_rows", 0), "counter"),
                        ("prefix_cache_prompt_tokens_sum", "Prompt tokens of admitted requests (the hit rate's base)",
                         m.get("prefix_cache_prompt_tokens", 0), "counter"),
                        ("prefill_tokens_per_s", "Prefill tokens per second of prefill time",
                         m["prefill_tokens_per_s"], "gauge"),
                        ("decode_tokens_per_s", "Decoded tokens per second of decode time",
                         m["decode_tokens_per_s"], "gauge")):
                    family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    g = family(f"mlc_llm:{name}", doc, labels=labels)
                    g.add_metric(values, value)
                    yield g
                steps = CounterMetricFamily("mlc_llm:decode_steps_by_batch_size", "Decode steps, by batch size",
                                            labels=labels + ["batch_size"])
                seconds = CounterMetricFamily("mlc_llm:decode_time_by_batch_size",
                                              "Seconds of decode steps, by batch size", labels=labels + ["batch_size"])
                for size in sorted(m["decode_batch_sizes"]):
                    steps.add_metric(values + [str(size)], m["decode_batch_sizes"][size])
                    seconds.add_metric(values + [str(size)], m["decode_time_by_batch_size"].get(size, 0.0))
                yield steps
                yield seconds

        self._gauges = _Gauges()
        r.register(self._gauges)

    def observe(self, usage: dict[str, Any], finish_reasons: list[Optional[str]]) -> None:
        """Called in the engine thread when a request ends."""
        v = self.label_values
        for reason in finish_reasons:
            self.success.labels(*v, reason or "abort").inc()
        self.prompt_tokens.labels(*v).inc(usage["prompt_tokens"])
        self.generation_tokens.labels(*v).inc(usage["completion_tokens"])
        extra = usage.get("extra") or {}
        if extra.get("ttft_s") is not None:
            self.ttft.labels(*v).observe(extra["ttft_s"])
        if extra.get("tpot_s") is not None:
            self.tpot.labels(*v).observe(extra["tpot_s"])
        self.e2e.labels(*v).observe(extra["end_to_end_latency_s"])

    def watch(self, engine) -> None:
        """Gauges read from `engine` on scrape; counters and histograms fed at each of its requests' end."""
        self.engine = engine
        engine.core.observers.append(self.observe)

    def serve_replicas(self, collector) -> None:
        """The engine runs in replicas (`--backend ray`): their series (collected by `collector`) replace this
        process's engine-side ones; the error counter stays here, where the HTTP answers are made."""
        for metric in self._engine_side + [self._gauges]:
            self.registry.unregister(metric)
        self.registry.register(collector)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


PROTECTED_PATHS = ("/v1", "/reset_prefix_cache")  # what the API key guards (health, metrics and the page are open)


class _AuthAndRequestId:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints): checks the bearer
    key on PROTECTED_PATHS and echoes an X-Request-Id header."""

    def __init__(self, app, api_key: Optional[str], on_reject: Callable[[], None],
                 allowed_hosts: Optional[list[str]] = None):
        self.app, self.api_key, self.on_reject = app, api_key, on_reject
        self.allowed_hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if self.allowed_hosts is not None and "*" not in self.allowed_hosts and host is not None and \
                _host_name(host) not in self.allowed_hosts:
            # a page on another site that resolves its name to 127.0.0.1 (DNS rebinding) names its own host here
            response = JSONResponse(error_body(f"Host '{host[:100]}' is not served here (--allowed-hosts)"),
                                    status_code=400)
            return await response(scope, receive, send)
        if self.api_key and scope["path"].startswith(PROTECTED_PATHS) and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            # bytes as sent (the header was decoded as latin-1) against the key's UTF-8 bytes, in constant time
            if not hmac.compare_digest(auth.encode("latin-1"), f"Bearer {self.api_key}".encode("utf-8")):
                self.on_reject()
                msg = "missing API key: send 'Authorization: Bearer <key>'" if not auth else "invalid API key"
                response = JSONResponse(error_body(msg, "invalid_request_error", code="invalid_api_key"),
                                        status_code=401)
                return await response(scope, receive, send)
        rid = headers.get("x-request-id")
        if not rid:
            return await self.app(scope, receive, send)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        return await self.app(scope, receive, send_with_id)


# ---- the app ------------------------------------------------------------------------------------------------------
class _State:
    def __init__(self, model_name: str):
        self.engine = None
        self.error: Optional[str] = None
        self.metrics = Metrics(model_name)
        self.started = time.time()


def create_app(load_engine: Callable[[], Any], model_name: str, settings: Optional[ServerSettings] = None) -> FastAPI:
    """`load_engine()` returns an AsyncMLCEngine; it is called in a thread once the server runs."""
    from contextlib import asynccontextmanager

    settings = settings or ServerSettings()
    state = _State(model_name)

    def load() -> None:
        try:
            engine = load_engine()
        except BaseException as e:  # noqa: BLE001 - reported through /health and every request
            state.error = f"{type(e).__name__}: {e}"
            logger.error("loading the model failed: %s", state.error)
            return
        engine.request_timeout = settings.request_timeout
        if hasattr(engine, "attach_metrics"):  # engine replicas (ray_serve.RemoteEngine) observe themselves
            engine.attach_metrics(state.metrics)
        else:
            state.metrics.watch(engine)
        state.engine = engine
        logger.info("model %s ready", model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=load, name="mlc-load", daemon=True)
        loader.start()
        yield
        loader.join(timeout=0)
        if state.engine is not None:
            await asyncio.to_thread(state.engine.terminate)

    app = FastAPI(title="MLC LLM (TVM) OpenAI-compatible server", lifespan=lifespan)

    def end_requests() -> None:
        """Called when the shutdown grace period is over: every request still running ends with an error (a stream
        gets it as its last event), so the connections close cleanly."""
        if state.engine is not None:
            state.engine.core.fail_all(ShuttingDown(f"the server is shutting down (grace period of "
                                                    f"{settings.shutdown_timeout:g} s over)"))

    app.state.end_requests = end_requests

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        state.metrics.errors.labels(model_name, str(e.status)).inc()
        response = _error_response(e)
        if e.status == 429:
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        logger.exception("internal error")
        state.metrics.errors.labels(model_name, "500").inc()
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    settings.check()
    app.add_middleware(_AuthAndRequestId, api_key=settings.api_key, on_reject=lambda: state.metrics.errors.labels(
        model_name, "401").inc(), allowed_hosts=settings.allowed_hosts)
    app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                       allow_credentials=settings.allow_credentials, allow_methods=settings.allowed_methods,
                       allow_headers=settings.allowed_headers)

    def ready_engine():
        if state.engine is None:
            if state.error:
                raise HTTPError(503, f"the model failed to load: {state.error}", "server_error")
            raise HTTPError(503, "the model is still loading; retry when GET /health returns 200", "server_error")
        return state.engine

    async def read_json(request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body of {size} bytes is over the limit of {MAX_BODY_BYTES} bytes")
        chunks, received = [], 0
        body = request.stream()
        while True:  # counted as it arrives: a chunked upload is cut at the limit; a stalled one times out
            try:
                chunk = await asyncio.wait_for(body.__anext__(), settings.body_timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise HTTPError(408, f"no part of the request body arrived for {settings.body_timeout:g} s",
                                code="body_timeout") from None
            received += len(chunk)
            if received > MAX_BODY_BYTES:
                raise HTTPError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = P.parse_json(raw, "the request body")
        except P.BadRequestError as e:
            raise HTTPError(400, str(e)) from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    @app.get("/health")
    async def health():
        if state.engine is not None and hasattr(state.engine, "health"):  # per replica (`--backend ray`)
            body = state.engine.health()
            return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
        if state.engine is not None:
            return {"status": "ok"}
        if state.error:
            return JSONResponse({"status": "error", "error": state.error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": int(state.started), "owned_by": "mlc_llm",
                "root": model_name}
        if state.engine is not None:  # vLLM's field: the longest prompt + answer one request may have
            card["max_model_len"] = state.engine.config.max_single_sequence_length
        return {"object": "list", "data": [card]}

    if settings.ui:
        app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

        @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
        async def chat_page():
            return FileResponse(UI_DIR / "index.html", headers=UI_HEADERS)

    async def generate(request: Request, create) -> Any:
        engine = ready_engine()
        limit = settings.max_queued_requests
        if limit is None:
            limit = 8 * engine.config.max_num_sequence
        waiting = engine.metrics()["num_waiting"]
        if waiting >= limit:  # a bounded queue, not unbounded memory: the client retries
            raise HTTPError(429, f"{waiting} requests are waiting (the limit is {limit}); retry shortly",
                            "rate_limit_error", code="queue_full")
        body = await read_json(request)
        if body.get("model") == model_name or (not settings.strict_model_name and isinstance(body.get("model"), str)):
            # the served model answers whatever name a client was written for (gpt-4o-mini...), as MLC LLM and
            # llama-server do; the response names the served model
            body["model"] = None
        try:
            result = await create(engine, body)
        except P.BadRequestError as e:
            raise _from_bad_request(e) from None
        except tuple(ENDED) as e:
            status, type_, code = ENDED[type(e)]
            raise HTTPError(status, str(e), type_, code=code) from None
        if isinstance(result, Response):  # the client went away
            return result
        if hasattr(result, "__aiter__"):  # stream=true (as pydantic read it)
            return StreamingResponse(_sse(result, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(_dump(result, model_name))

    async def watch_disconnect(request: Request, task: asyncio.Task) -> bool:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()  # AsyncMLCEngine aborts the request on cancellation
                return True
            await asyncio.sleep(0.25)
        return False

    async def non_stream(request: Request, coro):
        """Await the engine call, cancelling it if the client goes away (for a stream request this covers only the
        preparation; the stream itself is cancelled by Starlette on disconnect)."""
        task = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(watch_disconnect(request, task))
        try:
            return await task
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and watcher.result():
                logger.info("%s %s: the client went away; request aborted", request.method, request.url.path)
                return PlainTextResponse("client closed the request", status_code=499)  # nobody reads it
            raise
        finally:
            watcher.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, lambda engine, body: non_stream(request, engine.chat.completions.create(**body)))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, lambda engine, body: non_stream(request, engine.completions.create(**body)))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await generate(request, lambda engine, body: non_stream(request, engine.embeddings.create(**body)))

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache():
        """Drop the prefix cache's KV (vLLM's endpoint): running requests keep theirs."""
        engine = ready_engine()
        if asyncio.iscoroutinefunction(engine.reset_prefix_cache):
            await engine.reset_prefix_cache()
        else:
            await asyncio.to_thread(engine.reset_prefix_cache)
        return {"status": "ok"}

    describe_request_bodies(app)  # the bodies these endpoints read themselves, in /openapi.json

    return app


def _dump(obj, model_name: str) -> dict[str, Any]:
    d = obj.model_dump(mode="json", by_alias=True)
    d["model"] = model_name  # whichever accepted alias the request used, answer with the served name
    return d


async def _sse(stream, model_name: str):
    try:
        async for chunk in stream:
            yield f"data: {json.dumps(_dump(chunk, model_name), ensure_ascii=False)}\n\n"
    except P.BadRequestError as e:
        yield f"data: {json.dumps(error_body(str(e), param=e.param, code=e.code))}\n\n"
    except tuple(ENDED) as e:
        _, type_, code = ENDED[type(e)]
        yield f"data: {json.dumps(error_body(str(e), type_, code=code))}\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - the stream is already open: report in-band, as vLLM does
        logger.exception("error while streaming")
        yield f"data: {json.dumps(error_body(f'{type(e).__name__}: {e}', 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"


def _header_timeout_protocol(timeout: float):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not all in `timeout` seconds after
    it opened or after its previous response (a client sending its headers byte by byte would otherwise hold the
    connection for ever; other clients are never stalled by it, the loop serves them meanwhile)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


# ---- process entry (mlc_llm serve) --------------------------------------------------------------------------------
def prepare_process(settings: ServerSettings, host: str, log_level: str) -> None:
    """What every server process (`serve`, `ray_serve.serve_ray`) sets up before it listens on `host`."""
    if settings.allowed_hosts is None and host in LOOPBACK_HOSTS:
        settings.allowed_hosts = list(LOOPBACK_HOSTS)  # a local server answers only to local names
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s:     %(name)s: %(message)s")


def serve(model: str, model_lib: Optional[str], device: str, mode: str, overrides: Optional[str], host: str,
          port: int, settings: ServerSettings, served_model_name: Optional[str] = None,
          log_level: str = "info") -> None:
    import uvicorn

    from .engine import AsyncMLCEngine

    name = served_model_name or model
    prepare_process(settings, host, log_level)

    def load():
        return AsyncMLCEngine(model, model_lib=model_lib, device=device, mode=mode, overrides=overrides)

    app = create_app(load, name, settings)
    grace = settings.shutdown_timeout

    class Server(uvicorn.Server):
        """SIGTERM: stop accepting, give running requests `grace` seconds, then end the rest with an error event,
        and exit 0 (uvicorn would re-raise the signal and die by it)."""

        def handle_exit(self, sig, frame) -> None:
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and first:
                self._captured_signals.remove(sig)
                loop = asyncio.get_event_loop()
                loop.call_soon_threadsafe(loop.call_later, grace, app.state.end_requests)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + 1,
                            http=_header_timeout_protocol(settings.header_timeout))
    Server(config).run()
