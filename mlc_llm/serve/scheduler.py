"""EngineCore: continuous batching over the paged KV cache. One thread owns the model and calls step().

Each step is either a prefill (new or preempted sequences, ragged, at most prefill_chunk_size tokens; prompts longer
than that are prefilled in chunks over several steps) or one decode of every running sequence in a single
batch_decode call. When decode has no free KV pages, the most recently admitted request is preempted: its KV is
dropped and it goes back to the front of the queue with its tokens kept, to be prefilled again later.

Sharing between requests: while both prefill and decode work exist the two kinds of step alternate (running streams
keep flowing during a long prompt); a prefill takes the shortest remaining prompts first, and while other requests
run or wait one prompt's chunk is capped at `long_prefill_token_threshold` (a short request is answered between the
chunks of a long one). Choices 2..n of a request fork choice 1's prompt KV as slots allow; while other requests wait,
one request keeps at most half the sequence slots.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from .config import ResolvedConfig
from .request import Delta, Done, Failed, Request, RequestTimeout, Sequence
from .runner import ModelRunner
from .sampler import SampleRow, Sampled, device_inputs, on_device, sample_batch


_malloc_trim = None


def trim_heap() -> None:
    """glibc's malloc_trim(0): the heap's free pages go back to the OS (about a millisecond; nothing without glibc),
    so the process does not keep the peak of the last burst of requests."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


class CoreInbox:
    """What an engine thread offers other threads: messages into its inbox, a snapshot of its stats, and observers
    it calls when a request ends. EngineCore (generation) and EmbeddingCore (embeddings) are both one."""

    def __init__(self, stats: dict[str, Any]):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Called in the engine thread as fn(usage, finish_reasons) when a request ends without an error
        # (normally or aborted); the server's Prometheus metrics hang here. Must be quick and must not raise.
        self.observers: list = []
        self.stats = stats

    def submit(self, request) -> None:
        self.inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def stop(self) -> None:
        self.inbox.put(("stop", None))

    def fail_all(self, error: BaseException) -> None:
        """End every running and waiting request with `error` (a server's shutdown grace period is over)."""
        self.inbox.put(("fail_all", error))

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            snap = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in self.stats.items()}
        for kind in ("prefill", "decode"):
            seconds = snap[f"{kind}_time_s"]
            snap[f"{kind}_tokens_per_s"] = snap[f"{kind}_tokens"] / seconds if seconds else 0
        return snap


class EngineCore(CoreInbox):
    def __init__(self, runner: ModelRunner, cfg: ResolvedConfig):
        self.runner = runner
        self.cfg = cfg
        self.cache = runner.create_kv_cache(cfg.max_num_sequence, cfg.max_total_sequence_length,
                                            cfg.prefill_chunk_size, cfg.page_size)
        self.total_pages = runner.num_available_pages(self.cache)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_seq_ids = list(range(cfg.max_num_sequence - 1, -1, -1))
        self._admissions = 0
        self._prefilled_last = False
        # Grammar masks depend only on the tokens so far, so on a GPU they are built on a helper thread during the
        # forward pass. On the CPU the forward pass already uses every core: measured slower (bench/grammar.py:
        # 0.77x of plain decode overlapped vs 0.975x in line), so there they are built in line when sampling.
        self._masks_overlap = runner.device.dlpack_device_type() != 1  # 1 = kDLCPU
        # On the CPU the allocator's pool is emptied after each prefill step (see ModelRunner.release_pool); a GPU
        # keeps it (a device malloc per step costs more).
        self._release_after_prefill = runner.device.dlpack_device_type() == 1
        self._mask_pool: Optional[ThreadPoolExecutor] = None
        super().__init__({
            "prefill_tokens": 0, "prefill_time_s": 0.0, "prefill_steps": 0, "decode_tokens": 0,
            "decode_time_s": 0.0, "decode_steps": 0, "decode_host_time_s": 0.0,
            "decode_batch_sizes": collections.Counter(), "decode_time_by_batch_size": collections.Counter(),
            "prefill_batch_sizes": collections.Counter(), "preemptions": 0, "requests_finished": 0,
            "requests_aborted": 0, "last_request": None,
            "num_running": 0, "num_waiting": 0, "kv_pages_total": self.total_pages, "kv_pages_free": self.total_pages,
        })

    def _publish_gauges(self) -> None:
        """Queue and KV gauges, read here in the engine thread (the KV cache is not touched from other threads)."""
        free = self.runner.num_available_pages(self.cache)
        with self._lock:
            self.stats.update(num_running=len(self.running), num_waiting=len(self.waiting), kv_pages_free=free)

    # ---- loop -----------------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while True:
            busy = bool(self.waiting or self.running)
            try:
                item = self.inbox.get(block=not busy)
            except queue.Empty:
                item = None
            while item is not None:
                if not self._handle(item):
                    return
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._expire()
            if self.waiting or self.running:
                try:
                    self.step()
                except Exception as e:  # a failed forward fails its requests, not the engine
                    for req in list(self.running) + list(self.waiting):
                        self._finish_request(req, error=e)
                if not (self.waiting or self.running):
                    trim_heap()  # the engine just went idle
            self._publish_gauges()

    def _expire(self) -> None:
        now = time.perf_counter()
        for req in [r for r in list(self.running) + list(self.waiting) if r.deadline is not None and now > r.deadline]:
            self._finish_request(req, error=RequestTimeout(
                f"the request took longer than the server's limit of {req.deadline - req.arrival:g} s"))

    def _handle(self, item) -> bool:
        kind, payload = item
        if kind == "add":
            self.waiting.append(payload)
        elif kind == "abort":
            for req in list(self.running) + list(self.waiting):
                if req.id == payload:
                    with self._lock:
                        self.stats["requests_aborted"] += 1
                    self._finish_request(req, reason="abort")
        elif kind == "fail_all":
            for req in list(self.running) + list(self.waiting):
                self._finish_request(req, error=payload)
        elif kind == "stop":
            for req in list(self.running) + list(self.waiting):
                self._finish_request(req, error=RuntimeError("the engine was terminated"))
            return False
        return True

    def step(self) -> None:
        self._admit()
        self._fork_choices()
        order = (self._decode_step, self._prefill_step) if self._prefilled_last else \
            (self._prefill_step, self._decode_step)
        for run in order:
            if run():
                self._prefilled_last = run == self._prefill_step
                return

    # ---- prefill --------------------------------------------------------------------------------------------------
    def _running_seqs(self) -> list[Sequence]:
        return [s for r in self.running for s in r.seqs if not s.finished]

    def _free_pages(self) -> int:
        return self.runner.num_available_pages(self.cache)

    def _pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.cfg.page_size)

    def _kv_tokens(self) -> int:
        return sum(s.kv_len for s in self._running_seqs())

    def _admit(self) -> None:
        """Move waiting requests to running while sequences, pages and total length allow (FIFO)."""
        while self.waiting:
            req = self.waiting[0]
            seqs_after = len(self._running_seqs()) + sum(not s.finished for s in req.seqs)
            need_tokens = sum(len(s.tokens) for s in req.seqs)
            headroom = seqs_after  # one new page per sequence for its next decode step
            if seqs_after > self.cfg.max_num_sequence:
                return
            if self._kv_tokens() + need_tokens + 8 * seqs_after > self.cfg.max_total_sequence_length and self.running:
                return
            if self._pages_for(need_tokens) + headroom > self._free_pages() and self.running:
                return
            self.waiting.popleft()
            for s in req.seqs:
                if not s.finished:
                    s.seq_id = self.free_seq_ids.pop()
                    s.kv_len = 0
                    self.runner.add_sequence(self.cache, s.seq_id)
            req.admitted_at = self._admissions
            self._admissions += 1
            self.running.append(req)

    def _fork_choices(self) -> None:
        """Start choices 2..n of running requests: a fork of a sibling's KV up to the prompt's last token (which the
        next decode step reads, so each choice samples its first token itself), or, when no sibling holds the prompt
        any more, a fresh sequence that prefills it again."""
        share = max(1, self.cfg.max_num_sequence // 2)
        for req in self.running:
            if not req.unforked:
                continue
            live = [s for s in req.seqs if not s.finished and s.seq_id is not None]
            keep = len(req.prompt) - 1
            parent = next((s for s in live if s.kv_len >= keep), None) if keep > 0 else None
            if parent is None and live:
                continue  # the prompt is still being prefilled
            free = len(self.free_seq_ids)
            if self.waiting:  # others are queued: this request keeps at most `share` slots
                free = min(free, share - len(live))
            for _ in range(max(0, min(req.unforked, free))):
                child = req.fork(req.gen.n - req.unforked)
                child.seq_id = self.free_seq_ids.pop()
                if parent is not None:
                    self.runner.fork_sequence(self.cache, parent.seq_id, child.seq_id, keep)
                    child.kv_len = keep
                else:
                    self.runner.add_sequence(self.cache, child.seq_id)
                req.unforked -= 1

    def _prefill_step(self) -> bool:
        todo = [(req, s) for req in self.running for s in req.seqs
                if not s.finished and len(s.pending) > 1 and s.seq_id is not None]
        todo.sort(key=lambda rs: len(rs[1].pending))  # shortest remaining prompt first
        busy = len(todo) > 1 or bool(self.waiting) or any(len(s.pending) == 1 for s in self._running_seqs())
        cap = (busy and self.cfg.long_prefill_token_threshold) or self.cfg.prefill_chunk_size
        budget = self.cfg.prefill_chunk_size
        batch: list[tuple[Request, Sequence, list[int]]] = []
        for req, s in todo:
            if budget <= 0:
                break
            chunk = s.pending[:min(budget, cap)]
            if batch and len(chunk) < len(s.pending) and busy:
                break  # short prompts finish in a step of their own, not behind a long one's chunk
            budget -= len(chunk)
            batch.append((req, s, chunk))
        if not batch:
            return False
        start = time.perf_counter()
        logits = self.runner.batch_prefill(self.cache, [s.seq_id for _, s, _ in batch], [c for _, _, c in batch])
        if self._release_after_prefill:
            self.runner.release_pool()
        elapsed = time.perf_counter() - start
        n_tokens = sum(len(c) for _, _, c in batch)
        with self._lock:
            self.stats["prefill_tokens"] += n_tokens
            self.stats["prefill_time_s"] += elapsed
            self.stats["prefill_steps"] += 1
            self.stats["prefill_batch_sizes"][len(batch)] += 1
        ready_rows, ready = [], []
        for row, (req, s, chunk) in enumerate(batch):
            s.kv_len += len(chunk)
            req.prefill_tokens += len(chunk)
            if not s.pending:  # all known tokens are in: these logits predict the next one
                ready_rows.append(row)
                ready.append((req, s))
        if ready:
            self._sample_and_commit(logits[ready_rows], ready)
        return True

    # ---- decode ---------------------------------------------------------------------------------------------------
    def _decode_step(self) -> bool:
        seqs = [(r, s) for r in self.running for s in r.seqs if not s.finished and len(s.pending) == 1]
        if not seqs:
            return False
        while len(seqs) > self._free_pages() and len(self.running) > 1:
            victim = max(self.running, key=lambda r: r.admitted_at)
            self._preempt(victim)
            seqs = [(r, s) for r, s in seqs if r is not victim]
        if len(seqs) > self._free_pages():
            for r, s in seqs:  # one request alone does not fit: the KV cache is full
                self._finish_seq(r, s, "length")
            return True
        start = time.perf_counter()
        # the library's sampler, when it takes every row (no forks to make: those copy logits rows on the host)
        on_dev = self.cfg.sampler == "device" and all(
            on_device(r.gen.sampling, s.matcher is not None) for r, s in seqs)
        masks = self._masks_ahead([s for _, s in seqs]) if self._masks_overlap and not on_dev else None
        tokens = [s.pending[0] for _, s in seqs]
        logits = self.runner.batch_decode(self.cache, [s.seq_id for _, s in seqs], tokens, to_host=not on_dev)
        elapsed = time.perf_counter() - start
        for _, s in seqs:
            s.kv_len += 1
        with self._lock:
            self.stats["decode_tokens"] += len(seqs)
            self.stats["decode_time_s"] += elapsed
            self.stats["decode_steps"] += 1
            self.stats["decode_batch_sizes"][len(seqs)] += 1
            self.stats["decode_time_by_batch_size"][len(seqs)] += elapsed
        host_start = time.perf_counter()
        if on_dev:
            self._sample_on_device_and_commit(logits, seqs)
        else:
            try:
                ahead = masks.result() if masks is not None else None
            except Exception:  # a grammar failed: the sampling below finds which one, row by row
                ahead = None
            self._sample_and_commit(logits, seqs, ahead)
        with self._lock:  # Python-side cost of a step: sampling, detokenizing, stop checks, delivery
            self.stats["decode_host_time_s"] += time.perf_counter() - host_start
        return True

    def _preempt(self, req: Request) -> None:
        for s in req.seqs:
            self._release(s)
            s.kv_len = 0  # its tokens are kept and prefilled again on readmission
        self.running.remove(req)
        self.waiting.appendleft(req)
        with self._lock:
            self.stats["preemptions"] += 1

    # ---- sampling and output --------------------------------------------------------------------------------------
    def _masks_ahead(self, seqs: list[Sequence]):
        """Future of {sequence index in seqs: allowed-token mask} for the grammar-constrained ones, or None."""
        constrained = [(i, s.matcher) for i, s in enumerate(seqs) if s.matcher is not None]
        if not constrained:
            return None
        if self._mask_pool is None:
            self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="mlc-grammar")
        vocab = self.runner.vocab_size
        from .grammar import allowed_tokens

        def work():
            return dict(zip((i for i, _ in constrained), allowed_tokens([m for _, m in constrained], vocab)))

        return self._mask_pool.submit(work)

    def _sample_and_commit(self, logits: np.ndarray, seqs: list[tuple[Request, Sequence]],
                           masks: Optional[dict[int, np.ndarray]] = None) -> None:
        sample_rows = [SampleRow(r.gen.sampling, s.rng, s.counts, s.matcher) for r, s in seqs]
        for i, mask in (masks or {}).items():
            sample_rows[i].allowed = mask
        sampled = self._sample(logits, seqs, sample_rows)
        now = time.perf_counter()
        for (req, s), out in zip(seqs, sampled):
            if out is None or s.finished:  # its request ended with an error while sampling
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            self._commit(req, s, out)

    def _sample(self, logits: np.ndarray, seqs: list[tuple[Request, Sequence]],
                rows: list[SampleRow]) -> list[Optional[Sampled]]:
        """sample_batch; if it fails (a grammar that breaks at run time, say), row by row, ending only the requests
        whose rows fail (None in their place)."""
        try:
            return sample_batch(logits, rows)
        except Exception:  # noqa: BLE001 - which row failed is found below
            pass
        out: list[Optional[Sampled]] = []
        for i, ((req, s), row) in enumerate(zip(seqs, rows)):
            try:
                row.allowed = None
                out.append(sample_batch(logits[i:i + 1], [row])[0])
            except Exception as e:  # noqa: BLE001 - reported to that request's client
                what = "its response grammar failed" if s.matcher is not None else "sampling failed"
                self._finish_request(req, error=RuntimeError(f"the request ended: {what}: {e}"))
                out.append(None)
        return out

    def _sample_on_device_and_commit(self, logits, seqs: list[tuple[Request, Sequence]]) -> None:
        rows = [SampleRow(r.gen.sampling, s.rng, s.counts) for r, s in seqs]
        tokens, logprobs = self.runner.sample_on_device(logits, *device_inputs(rows))
        now = time.perf_counter()
        for (req, s), row, token, logprob in zip(seqs, rows, tokens, logprobs):
            if req.first_token_time is None:
                req.first_token_time = now
            self._commit(req, s, Sampled(int(token), float(logprob) if row.params.logprobs else None))

    def _commit(self, req: Request, s: Sequence, out: Sampled) -> None:
        t = out.token
        s.tokens.append(t)
        s.counts[t] = s.counts.get(t, 0) + 1
        if s.matcher is not None and not s.matcher.consume_token(t):  # the grammar broke at run time
            self._finish_request(req, error=RuntimeError(
                f"the request ended: its response grammar failed: {s.matcher.get_error()}"))
            return
        logprobs = [(out, req.tokenizer.token_text(t))] if out.logprob is not None else []
        if t in req.gen.stop_token_ids and not req.gen.ignore_eos:
            self._deliver(req, Delta(s.index, "", logprobs))
            self._finish_seq(req, s, "stop")
            return
        text = s.stopper.put(s.streamer.put([t]))
        reason = None
        if s.stopper.stopped or (s.matcher is not None and s.matcher.is_stopped()):  # grammar complete: done
            reason = "stop"
        elif s.num_generated >= req.gen.max_tokens or len(s.tokens) >= self.cfg.max_single_sequence_length:
            reason = "length"
        self._deliver(req, Delta(s.index, text, logprobs))
        if reason:
            self._finish_seq(req, s, reason)

    def _release(self, s: Sequence) -> None:
        if s.seq_id is not None:
            self.runner.remove_sequence(self.cache, s.seq_id)  # frees its KV pages at once
            self.free_seq_ids.append(s.seq_id)
            s.seq_id = None

    def _finish_seq(self, req: Request, s: Sequence, reason: str) -> None:
        tail = "" if s.stopper.stopped else s.stopper.put(s.streamer.finish()) + s.stopper.finish()
        s.finish_reason = reason
        self._release(s)
        self._deliver(req, Delta(s.index, tail, [], reason))
        if req.finished:
            self._finish_request(req)

    def _finish_request(self, req: Request, reason: str = "abort", error: Optional[BaseException] = None) -> None:
        """Normal end (every choice finished), or an early end of the whole request (abort, error)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return
        req.unforked = 0
        for s in req.seqs:
            if not s.finished:
                s.finish_reason = "error" if error else reason
                self._release(s)
                if error is None:
                    self._deliver(req, Delta(s.index, "", [], reason))
        self._publish_gauges()  # before the final event: a caller that got its answer sees current gauges
        if error is not None:
            self._deliver(req, Failed(error))
            return
        usage = req.usage()
        with self._lock:
            self.stats["requests_finished"] += 1
            self.stats["last_request"] = usage
        for observe in self.observers:
            try:
                observe(usage, [s.finish_reason for s in req.seqs])
            except Exception:  # metrics must never stop the engine
                pass
        self._deliver(req, Done(usage))

    @staticmethod
    def _deliver(req: Request, event) -> None:
        try:
            req.sink(event)
        except Exception:  # a consumer that went away must not stop the engine
            pass
