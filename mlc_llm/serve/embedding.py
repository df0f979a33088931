"""EmbeddingCore: one thread that batches the inputs of concurrent embedding requests into the encoder library's
`encode` calls (the embeddings counterpart of scheduler.EngineCore, with the same entry points for the server).

Whatever is queued when the thread comes round is taken together, sorted by length and cut into batches of at most
`max_num_sequence` inputs and `prefill_chunk_size` padded tokens, so short inputs are not padded to long ones.
"""
from __future__ import annotations

import collections
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .config import ResolvedConfig
from .runner import ModelRunner
from .scheduler import CoreInbox, trim_heap


@dataclass
class EmbeddingJob:
    id: str
    inputs: list[list[int]]
    # called once in the engine thread: vectors float32 [len(inputs), hidden] (normalised if the model says so),
    # or the exception that ended the job
    done: Callable[[Any], None]
    arrived: float = field(default_factory=time.perf_counter)


class EmbeddingCore(CoreInbox):
    def __init__(self, runner: ModelRunner, cfg: ResolvedConfig, normalize: bool):
        self.runner, self.cfg, self.normalize = runner, cfg, normalize
        self._aborted: set[str] = set()
        super().__init__({
            "prefill_tokens": 0, "prefill_time_s": 0.0, "prefill_steps": 0, "decode_tokens": 0, "decode_time_s": 0.0,
            "decode_steps": 0, "decode_batch_sizes": collections.Counter(),
            "decode_time_by_batch_size": collections.Counter(), "preemptions": 0, "requests_finished": 0,
            "requests_aborted": 0, "num_running": 0, "num_waiting": 0, "kv_pages_total": 0, "kv_pages_free": 0,
            # inputs per `encode` call, and requests per round of batching (> 1: requests were batched together)
            "embedding_batch_sizes": collections.Counter(), "embedding_requests_per_round": collections.Counter(),
        })

    def submit(self, job: EmbeddingJob) -> None:
        with self._lock:
            self.stats["num_waiting"] += 1
        super().submit(job)

    # ---- loop -----------------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while True:
            items = [self.inbox.get()]
            while True:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            jobs: list[EmbeddingJob] = []
            with self._lock:
                self.stats["num_waiting"] -= sum(kind == "add" for kind, _ in items)
            for kind, payload in items:
                if kind == "add":
                    jobs.append(payload)
                elif kind == "abort":
                    self._aborted.add(payload)
                elif kind in ("fail_all", "stop"):
                    error = payload if kind == "fail_all" else RuntimeError("the engine was terminated")
                    for job in jobs:
                        self._end(job, error=error)
                    jobs = []
                    if kind == "stop":
                        return
            aborted = [j for j in jobs if j.id in self._aborted]
            self._aborted.clear()  # ids of jobs already done or not yet seen are dropped too: they are unique
            for job in aborted:
                with self._lock:
                    self.stats["requests_aborted"] += 1
                self._end(job, error=None)
            jobs = [j for j in jobs if j not in aborted]
            if jobs:
                self._run(jobs)
                self.runner.release_pool()  # every batch shape is new to the pool: keep nothing
                if self.inbox.empty():
                    trim_heap()  # idle again: hand the freed memory back

    def _batches(self, rows: list[tuple[int, int, Sequence[int]]]) -> list[list[tuple[int, int, Sequence[int]]]]:
        rows = sorted(rows, key=lambda r: len(r[2]))
        batches: list[list[tuple[int, int, Sequence[int]]]] = []
        for row in rows:
            cur = batches[-1] if batches else None
            # sorted by length: this row is the longest of the batch so far
            if cur is None or len(cur) >= self.cfg.max_num_sequence or \
                    (len(cur) + 1) * len(row[2]) > self.cfg.prefill_chunk_size:
                batches.append([row])
            else:
                cur.append(row)
        return batches

    def _run(self, jobs: list[EmbeddingJob]) -> None:
        hidden = self.runner.hidden_size
        out = [np.empty((len(j.inputs), hidden), np.float32) for j in jobs]
        failed: dict[int, BaseException] = {}
        rows = [(ji, ii, ids) for ji, job in enumerate(jobs) for ii, ids in enumerate(job.inputs)]
        with self._lock:
            self.stats["num_running"] = len(jobs)
            self.stats["embedding_requests_per_round"][len(jobs)] += 1
        for batch in self._batches(rows):
            live = [r for r in batch if r[0] not in failed]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                vectors = self.runner.encode([r[2] for r in live])
            except Exception as e:  # a failed forward fails the requests in it, not the engine
                for r in live:
                    failed.setdefault(r[0], e)
                continue
            with self._lock:
                self.stats["prefill_time_s"] += time.perf_counter() - t0
                self.stats["prefill_tokens"] += sum(len(r[2]) for r in live)
                self.stats["prefill_steps"] += 1
                self.stats["embedding_batch_sizes"][len(live)] += 1
            if self.normalize:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            for (ji, ii, _), v in zip(live, vectors):
                out[ji][ii] = v
        for ji, job in enumerate(jobs):
            self._end(job, error=failed.get(ji), vectors=out[ji])
        with self._lock:
            self.stats["num_running"] = 0

    def _end(self, job: EmbeddingJob, error: Optional[BaseException], vectors: Optional[np.ndarray] = None) -> None:
        if error is None and vectors is not None:
            with self._lock:
                self.stats["requests_finished"] += 1
            usage = {"prompt_tokens": sum(len(i) for i in job.inputs), "completion_tokens": 0,
                     "extra": {"end_to_end_latency_s": time.perf_counter() - job.arrived}}
            for observe in self.observers:
                observe(usage, ["stop"])
            job.done(vectors)
        else:
            job.done(error if error is not None else RuntimeError("the request was aborted"))
