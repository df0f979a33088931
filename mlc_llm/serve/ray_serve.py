"""`mlc_llm serve --backend ray --replicas N`: the same FastAPI app and routes, N engine replicas behind Ray Serve.

Two Ray Serve deployments:
  MLCIngress        one replica, no CPU reserved: `create_app` over a RemoteEngine (HTTP parsing, the API key, errors,
                    SSE). Ray Serve's proxy owns the socket.
  MLCEngineReplica  N replicas, each one AsyncMLCEngine on `threads` CPUs. The ingress calls `generate(kind, body)`
                    through a DeploymentHandle; PrefixAffinityRouter (Ray Serve's request-router API) sends requests
                    sharing a prefix (a chat's turns, a system prompt) to the replica that served it, for its prefix
                    cache.
Replicas report to a MetricsHub actor every second: their Prometheus series (labelled `replica`), queue and KV
gauges, and whether they applied the latest prefix-cache reset. The ingress reads it for /metrics, /health and the
429 queue limit. Ray is an optional extra (`pip install -e .[ray]`); nothing here is imported without `--backend ray`.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any, AsyncIterator, Optional

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from . import protocol as P
from .request import RequestTimeout
from .server import Overloaded, ReplicaUnavailable, ServerSettings, create_app, prepare_process

logger = logging.getLogger("mlc_llm.serve")

APP_NAME = "mlc_llm"
REPORT_PERIOD_S = 1.0
STALE_AFTER_S = 5.0  # a replica silent for this long is gone (killed, or its node lost)
RETRIES = 3  # a request whose replica died before it answered anything goes to another one


# ---- replica reports ----------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class MetricsHub:
    """What each engine replica last reported, and the prefix-cache reset generation the replicas follow."""

    def __init__(self):
        self.reports: dict[str, dict[str, Any]] = {}
        self.reset_generation = 0

    def put(self, replica: str, report: dict[str, Any]) -> int:
        self.reports[replica] = report
        return self.reset_generation

    def get(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {k: v for k, v in self.reports.items() if now - v["time"] < STALE_AFTER_S}

    def request_reset(self) -> int:
        self.reset_generation += 1
        return self.reset_generation


def _hub(app_name: str):
    # detached: it outlives a replica's restart; serve_ray kills it with the app
    return MetricsHub.options(name=f"{app_name}:metrics", namespace="mlc_llm", get_if_exists=True,
                              lifetime="detached").remote()


# ---- the engine replica -------------------------------------------------------------------------------------------
def _error_item(e: BaseException) -> dict[str, Any]:
    """An exception as data (the ingress turns it back into the server's error answer)."""
    if isinstance(e, P.BadRequestError):
        return {"error": {"kind": "model_not_found" if isinstance(e, P.ModelNotFoundError) else "bad_request",
                          "message": str(e), "param": e.param, "code": e.code}}
    if isinstance(e, RequestTimeout):
        return {"error": {"kind": "timeout", "message": str(e)}}
    return {"error": {"kind": "internal", "message": f"{type(e).__name__}: {e}"}}


def _raise_error_item(err: dict[str, Any]) -> None:
    kind, message = err["kind"], err["message"]
    if kind in ("bad_request", "model_not_found"):
        e = (P.ModelNotFoundError if kind == "model_not_found" else P.BadRequestError)(message)
        e.param, e.code = err.get("param"), err.get("code")
        raise e
    if kind == "timeout":
        raise RequestTimeout(message)
    raise RuntimeError(message)


class EngineReplica:
    """One AsyncMLCEngine. `generate` yields {"result"} (non-stream), or {"stream": True} then {"chunk"}s; an error
    comes as {"error"} in place of the next item."""

    async def __init__(self, model: str, model_lib: Optional[str], device: str, mode: str, overrides: Optional[str],
                       served_name: str, request_timeout: Optional[float], app_name: str = APP_NAME):
        from .engine import AsyncMLCEngine
        from .server import Metrics

        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = await asyncio.to_thread(AsyncMLCEngine, model, model_lib=model_lib, device=device, mode=mode,
                                              overrides=overrides)
        self.engine.request_timeout = request_timeout
        self.metrics = Metrics(served_name, replica=self.replica)
        self.metrics.watch(self.engine)
        self.requests = 0
        self.hub = _hub(app_name)
        self.reset_applied: Optional[int] = None  # the generation at start counts as applied: the cache is empty
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever())
        logger.info("engine replica %s (pid %d) ready", self.replica, os.getpid())

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._report()
            except Exception:  # noqa: BLE001 - the hub may be restarting; the next report retries
                logger.exception("engine replica %s: report failed", self.replica)
            await asyncio.sleep(REPORT_PERIOD_S)

    async def _report(self) -> None:
        m = self.engine.metrics()
        report = {"time": time.time(), "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                  "requests": self.requests, "num_running": m["num_running"], "num_waiting": m["num_waiting"],
                  "kv_pages_free": m["kv_pages_free"], "kv_pages_total": m["kv_pages_total"],
                  "prefix_cache_sequences": m.get("prefix_cache_sequences", 0),
                  "max_num_sequence": self.engine.config.max_num_sequence, "reset_applied": self.reset_applied,
                  "series": self.metrics.render().decode()}
        generation = await self.hub.put.remote(self.replica, report)
        if self.reset_applied is None:
            self.reset_applied = generation
        elif generation != self.reset_applied:
            await asyncio.to_thread(self.engine.reset_prefix_cache)
            self.reset_applied = generation
            await self._report()

    def max_single_sequence_length(self) -> int:
        return self.engine.config.max_single_sequence_length

    async def generate(self, kind: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.requests += 1
        create = {"chat": self.engine.chat.completions.create, "completion": self.engine.completions.create,
                  "embedding": self.engine.embeddings.create}[kind]
        try:
            result = await create(**body)
        except Exception as e:  # noqa: BLE001 - sent to the ingress, which answers with it
            yield _error_item(e)
            return
        if not hasattr(result, "__aiter__"):
            yield {"result": result.model_dump(mode="json", by_alias=True)}
            return
        yield {"stream": True}
        try:  # a cancelled call (the client went away) raises CancelledError in here: the engine aborts
            async for chunk in result:
                yield {"chunk": chunk.model_dump(mode="json", by_alias=True)}
        except Exception as e:  # noqa: BLE001
            yield _error_item(e)

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine thread died."""
        if not self.engine._thread.is_alive():
            raise RuntimeError(f"engine replica {self.replica}: the engine thread is not running")


# ---- routing ------------------------------------------------------------------------------------------------------
PROMPT_BLOCK = 256  # characters per prefix unit of a completion prompt (a chat's unit is a message)


def prefix_keys(body: Any) -> list[str]:
    """Hashes of a request's growing prefixes: one per chat message, one per PROMPT_BLOCK characters of a prompt.
    A chat's next turn repeats all of its previous turn's messages, so it shares all of that turn's keys."""
    if not isinstance(body, dict):
        return []
    if isinstance(body.get("messages"), list):
        units = [json.dumps([m.get("role"), m.get("content")], sort_keys=True, ensure_ascii=False)
                 if isinstance(m, dict) else repr(m) for m in body["messages"]]
    elif body.get("prompt") is not None:
        text = body["prompt"] if isinstance(body["prompt"], str) else json.dumps(body["prompt"])
        units = [text[i:i + PROMPT_BLOCK] for i in range(0, len(text), PROMPT_BLOCK)]
    else:
        return []
    h, keys = hashlib.blake2b(digest_size=16), []
    for unit in units[:64]:
        h.update(unit.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
        keys.append(h.hexdigest())
    return keys


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Prefers the replica that last served the longest prefix of the request (learned from this handle's routing)
    longer than its first unit; a prefix never seen goes to the replica its first two units (a chat's system prompt
    and first user message) hash to — rendezvous hashing: stable while replicas come and go, the same in every
    ingress, and new chats sharing only a system prompt still spread. The preferred replica is skipped when its queue
    is `imbalance` requests longer than the shortest one, or full; the others are then tried by queue length."""

    def initialize_state(self, imbalance: int = 4, max_prefixes: int = 100_000):
        self._imbalance, self._max_prefixes = imbalance, max_prefixes
        self._owner: OrderedDict[str, Any] = OrderedDict()  # prefix key -> ReplicaID

    @staticmethod
    def _body(pending: Optional[PendingRequest]) -> Any:
        if pending is None or len(pending.args) < 2:
            return None
        return pending.args[1]

    def preferred(self, keys: list[str], candidates: list[RunningReplica]) -> Optional[RunningReplica]:
        if not keys:
            return None
        by_id = {r.replica_id: r for r in candidates}
        for key in reversed(keys[1:] or keys):
            owner = self._owner.get(key)
            if owner in by_id:
                return by_id[owner]
        home = keys[min(1, len(keys) - 1)]
        return max(candidates, key=lambda r: hashlib.blake2b((home + r.replica_id.unique_id).encode(),
                                                             digest_size=8).digest())

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        others = list(candidate_replicas)
        random.shuffle(others)
        best = self.preferred(prefix_keys(self._body(pending_request)), candidate_replicas)
        if best is None:
            return [others[:2], others[2:]]  # power of two choices, as Ray Serve's default router
        shortest = min(self._queue_len(r) for r in candidate_replicas)
        if self._queue_len(best) - shortest > self._imbalance:
            return [others[:2], others[2:]]
        return [[best], [r for r in others if r is not best]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        for key in prefix_keys(self._body(pending_request)):
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > self._max_prefixes:
            self._owner.popitem(last=False)


# ---- the ingress --------------------------------------------------------------------------------------------------
class _Dumped:
    """A response already dumped to JSON by the replica (server.create_app dumps what the engine returns)."""

    def __init__(self, data: dict[str, Any]):
        self.data = data

    def model_dump(self, **_) -> dict[str, Any]:
        return dict(self.data)


class _Endpoint:
    def __init__(self, engine: "RemoteEngine", kind: str):
        self._engine, self._kind = engine, kind

    def create(self, /, **kwargs):
        return self._engine._run(self._kind, kwargs)


class RemoteEngine:
    """What create_app needs of an engine, over the replicas: the OpenAI endpoints, config bounds, queue gauges."""

    def __init__(self, handle, hub, max_single_sequence_length: int):
        self._handle, self._hub = handle, hub
        self._max_single_sequence_length = max_single_sequence_length
        self.request_timeout: Optional[float] = None  # applied by the replicas (given at their start)
        self.chat = SimpleNamespace(completions=_Endpoint(self, "chat"))
        self.completions = _Endpoint(self, "completion")
        self.embeddings = _Endpoint(self, "embedding")
        self._reports: dict[str, dict[str, Any]] = {}
        self._refresh()

    # -- replica reports
    def _refresh(self) -> None:
        self._reports = ray.get(self._hub.get.remote())

    async def _refresh_async(self) -> None:
        self._reports = await self._hub.get.remote()

    @property
    def config(self) -> SimpleNamespace:
        """The bounds create_app reads: sequence slots of the live replicas together (the 429 queue limit is 8 per
        slot), and the longest request."""
        return SimpleNamespace(max_num_sequence=max(1, sum(r["max_num_sequence"] for r in self._reports.values())),
                               max_single_sequence_length=self._max_single_sequence_length)

    def metrics(self) -> dict[str, Any]:
        return {"num_waiting": sum(r["num_waiting"] for r in self._reports.values()),
                "num_running": sum(r["num_running"] for r in self._reports.values())}

    def health(self) -> dict[str, Any]:
        replicas = [{"replica": k, "pid": r["pid"], "node": r["node"], "requests": r["requests"],
                     "num_running": r["num_running"], "num_waiting": r["num_waiting"],
                     "kv_pages_used": r["kv_pages_total"] - r["kv_pages_free"], "kv_pages_total": r["kv_pages_total"],
                     "prefix_cache_sequences": r["prefix_cache_sequences"], "seconds_since_report":
                     round(time.time() - r["time"], 2)} for k, r in sorted(self._reports.items())]
        return {"status": "ok" if replicas else "error", "replicas": replicas}

    def attach_metrics(self, metrics) -> None:
        engine = self

        class _Replicas:
            def collect(self):
                from prometheus_client.parser import text_string_to_metric_families

                merged: dict[str, Any] = {}
                for report in engine._reports.values():
                    for family in text_string_to_metric_families(report["series"]):
                        if family.name in merged:
                            merged[family.name].samples.extend(family.samples)
                        else:
                            merged[family.name] = family
                yield from merged.values()

        metrics.serve_replicas(_Replicas())

    def refresh_forever(self) -> None:
        """A daemon thread: the reports /metrics, /health and the queue limit read."""
        while True:
            time.sleep(REPORT_PERIOD_S)
            try:
                self._refresh()
            except Exception:  # noqa: BLE001 - the hub restarting; keep the last reports meanwhile
                logger.exception("reading the replica reports failed")

    async def reset_prefix_cache(self, timeout: float = 60.0) -> None:
        """Every live replica drops its cached sequences (each applies the new generation at its next report)."""
        generation = await self._hub.request_reset.remote()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self._refresh_async()
            if all((r["reset_applied"] or 0) >= generation for r in self._reports.values()):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the engine replicas did not reset their prefix caches within {timeout:g} s")

    # -- requests
    async def _run(self, kind: str, body: dict[str, Any]):
        for attempt in range(RETRIES):
            gen = self._handle.options(stream=True).generate.remote(kind, body)
            try:
                first = await gen.__anext__()
            except (RayActorError, ActorUnavailableError) as e:
                gen.cancel()
                # nothing was answered yet: the request is safe to run again on another replica
                logger.warning("engine replica lost before answering (%s); attempt %d of %d", type(e).__name__,
                               attempt + 1, RETRIES)
                if attempt + 1 == RETRIES:
                    raise ReplicaUnavailable(f"the engine replica serving this request stopped ({type(e).__name__}); "
                                             f"retry") from None
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            except BackPressureError as e:
                raise Overloaded(str(e)) from None
            except asyncio.CancelledError:
                gen.cancel()  # the client went away: the replica's engine aborts the request
                raise
            if "error" in first:
                _raise_error_item(first["error"])
            if "result" in first:
                return _Dumped(first["result"])
            return self._relay(gen)
        raise AssertionError("unreachable")

    @staticmethod
    async def _relay(gen) -> AsyncIterator[_Dumped]:
        finished = False
        try:
            async for item in gen:
                if "error" in item:
                    _raise_error_item(item["error"])
                yield _Dumped(item["chunk"])
            finished = True
        except (RayActorError, ActorUnavailableError) as e:
            raise ReplicaUnavailable(f"the engine replica serving this stream stopped ({type(e).__name__})") from None
        finally:
            if not finished:
                gen.cancel()  # a client that went away: cancelling the call aborts the request in the replica


@serve.ingress()
class Ingress:
    """The HTTP front: server.create_app over a RemoteEngine."""

    def __init__(self, engine_handle, model_name: str, settings: ServerSettings, app_name: str = APP_NAME):
        self._handle, self._model_name, self._settings = engine_handle, model_name, settings
        self._hub = _hub(app_name)

    def __serve_build_asgi_app__(self):
        def load() -> RemoteEngine:  # called in a thread of create_app's
            longest = self._handle.max_single_sequence_length.remote().result(timeout_s=600)
            engine = RemoteEngine(self._handle, self._hub, longest)
            threading.Thread(target=engine.refresh_forever, name="mlc-replica-reports", daemon=True).start()
            return engine

        return create_app(load, self._model_name, self._settings)


# ---- process entry ------------------------------------------------------------------------------------------------
def build_app(model: str, model_lib: Optional[str], device: str, mode: str, overrides: Optional[str],
              served_name: str, settings: ServerSettings, replicas: int, threads: int, app_name: str = APP_NAME):
    """The Ray Serve application (bind graph): the ingress over `replicas` engine replicas of `threads` CPUs each."""
    gpu = device.startswith(("cuda", "rocm", "metal", "vulkan"))
    engine = serve.deployment(EngineReplica, name="MLCEngineReplica").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": threads, "num_gpus": 1 if gpu else 0,
                           "runtime_env": {"env_vars": {"TVM_NUM_THREADS": str(threads)}}},
        # requests beyond the engine's sequence slots wait in its own queue; Ray's limit only bounds that queue
        max_ongoing_requests=settings.max_queued_requests or 256,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        health_check_period_s=5, health_check_timeout_s=60,
        request_router_config=RequestRouterConfig(request_router_class=PrefixAffinityRouter))
    ingress = serve.deployment(Ingress, name="MLCIngress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=settings.shutdown_timeout + 1)
    return ingress.bind(engine.bind(model, model_lib, device, mode, overrides, served_name, settings.request_timeout,
                                    app_name), served_name, settings, app_name)


def serve_ray(model: str, model_lib: Optional[str], device: str, mode: str, overrides: Optional[str], host: str,
              port: int, settings: ServerSettings, served_model_name: Optional[str] = None, replicas: int = 1,
              ray_address: Optional[str] = None, log_level: str = "info") -> None:
    """Start (or join, with `ray_address`) a Ray cluster, run the app until SIGINT / SIGTERM, then remove it."""
    name = served_model_name or model
    prepare_process(settings, host, log_level)
    cpus = os.cpu_count() or 1
    threads = int(os.environ.get("TVM_NUM_THREADS") or 0) or max(1, cpus // replicas)
    if not ray_address and replicas * threads > cpus:
        raise ValueError(f"{replicas} replicas x {threads} threads need {replicas * threads} CPUs; this machine has "
                         f"{cpus}: lower --replicas or TVM_NUM_THREADS (device.num_threads)")
    # Ctrl-C reaches the terminal's whole process group: the cluster's processes (started now, inheriting the
    # dispositions) ignore it, and this process shuts them down in order
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if ray_address:
            try:
                ray.init(address=ray_address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as e:
                raise ValueError(
                    f"--ray-address {ray_address}: cannot join the Ray cluster ({str(e).splitlines()[0][:200]}). "
                    "A cluster with token authentication needs RAY_AUTH_MODE=token and its token "
                    "(~/.ray/auth_token or RAY_AUTH_TOKEN) when its address is given; `--ray-address auto` finds a "
                    "local cluster's token itself") from None
        else:
            # a cluster whose processes were killed with ours (SIGTERM to the group) must not hold the exit 60 s
            ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                     logging_level=logging.WARNING, _system_config={"gcs_rpc_server_reconnect_timeout_s": 10})
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stop = threading.Event()

    def on_signal(*_) -> None:
        if stop.is_set():  # a second Ctrl-C: leave now
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(model, model_lib, device, mode, overrides, name, settings, replicas, threads),
                  name=APP_NAME, route_prefix="/", blocking=False)
        print(f"serving {name} on http://{host}:{port} with {replicas} engine replica(s) x {threads} thread(s) "
              f"(Ray Serve{', cluster ' + ray_address if ray_address else ''})", flush=True)
        stop.wait()
    finally:
        logger.info("stopping: running requests get %g s", settings.shutdown_timeout)
        # bounded: a cluster already half gone (its processes killed with ours) must not hang the exit
        remover = threading.Thread(target=_remove_app, args=(not ray_address,), daemon=True)
        remover.start()
        remover.join(settings.shutdown_timeout + 20)
        ray.shutdown()


def _remove_app(whole_serve: bool) -> None:
    try:
        serve.delete(APP_NAME)
        ray.kill(ray.get_actor(f"{APP_NAME}:metrics", namespace="mlc_llm"))
        if whole_serve:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - the cluster may already be gone
        logger.exception("removing the Ray Serve application failed")
