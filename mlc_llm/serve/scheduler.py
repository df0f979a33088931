"""EngineCore: continuous batching over the paged KV cache. One thread owns the model and calls step().

Each step first admits waiting requests (reusing cached prefixes) and forks choices 2..n, then runs one forward
pass: a prefill (new or preempted sequences, ragged, at most prefill_chunk_size tokens; longer prompts in chunks) or
one decode of every running sequence (batch_decode, or batch_verify when speculative drafts are proposed). What to do
is decided by policy.py from a snapshot of the state; this file carries the decisions out on the model and the KV
cache. A preempted request's KV is dropped and it goes back to the front of the queue with its tokens kept.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np

from . import policy
from .config import ResolvedConfig
from .prefix_cache import PrefixCache
from .request import Delta, Done, Failed, Request, RequestTimeout, Sequence
from .runner import ModelRunner
from .sampler import SampleRow, Sampled, device_inputs, on_device, sample_batch
from .speculative import ngram_propose


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
        # KV sequence ids are any integers: running sequences are bounded by max_num_sequence, recycled ones (the
        # prefix cache) by their own limit
        self._next_seq_id = 0
        self.prefix_cache = PrefixCache(cfg.prefix_cache_max_num_recycling_seqs) if cfg.prefix_cache else None
        if cfg.speculative_mode == "ngram":
            self._propose = lambda s, k: ngram_propose(s.tokens, k)
        elif cfg.speculative_mode == "small_draft":  # runner is a DraftPair: the draft model fills these in
            self._propose = lambda s, k: [policy.DRAFTED_LATER] * k
        else:
            self._propose = None
        self._step_costs: dict[tuple[str, int, int], float] = {}  # see _record_cost
        self._cost_key: Optional[tuple[str, int, int]] = None  # the decode step of this loop turn
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
            # prefix cache: prompt tokens of admitted requests, how many came from the cache, cached sequences
            "prefix_cache_prompt_tokens": 0, "prefix_cache_hit_tokens": 0, "prefix_cache_sequences": 0,
            "prefix_cache_evictions": 0,
            # speculative decoding: draft tokens proposed / accepted, and (sequence, step) pairs that verified drafts
            "spec_draft_tokens": 0, "spec_accepted_tokens": 0, "spec_verify_rows": 0, "spec_draft_time_s": 0.0,
        })

    def metrics(self) -> dict[str, Any]:
        snap = super().metrics()
        proposed, rows = snap["spec_draft_tokens"], snap["spec_verify_rows"]
        # MLC's names: share of draft tokens accepted; tokens a sequence gains per verify step (accepted + 1)
        snap["spec_accept_rate"] = snap["spec_accepted_tokens"] / proposed if proposed else 0.0
        snap["spec_accept_len"] = (snap["spec_accepted_tokens"] + rows) / rows if rows else 0.0
        prompt = snap["prefix_cache_prompt_tokens"]
        snap["prefix_cache_hit_rate"] = snap["prefix_cache_hit_tokens"] / prompt if prompt else 0.0
        return snap

    def _publish_gauges(self) -> None:
        """Queue and KV gauges, read here in the engine thread (the KV cache is not touched from other threads)."""
        free = self.runner.num_available_pages(self.cache)
        with self._lock:
            self.stats.update(num_running=len(self.running), num_waiting=len(self.waiting), kv_pages_free=free,
                              prefix_cache_sequences=len(self.prefix_cache.recycled) if self.prefix_cache else 0)

    # ---- loop -----------------------------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while self.run_once(block=True):
            pass

    def run_once(self, block: bool = False) -> bool:
        """Take the inbox's messages (waiting for one if idle and `block`), then run one step; False once stopped."""
        busy = bool(self.waiting or self.running)
        try:
            item = self.inbox.get(block=block and not busy)
        except queue.Empty:
            item = None
        while item is not None:
            if not self._handle(item):
                return False
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        turn_start = time.perf_counter()
        self._expire()
        if self.waiting or self.running:
            self._cost_key = None
            try:
                self.step()
            except Exception as e:  # a failed forward fails its requests, not the engine
                for req in list(self.running) + list(self.waiting):
                    self._finish_request(req, error=e)
            if not (self.waiting or self.running):
                trim_heap()  # the engine just went idle
        self._publish_gauges()
        if self._cost_key is not None:  # the whole turn: what a step really costs the requests
            self._record_cost(*self._cost_key, time.perf_counter() - turn_start)
        return True

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
        elif kind == "reset_prefix_cache":
            self.reset_prefix_cache()
            payload.set()
        elif kind == "stop":
            for req in list(self.running) + list(self.waiting):
                self._finish_request(req, error=RuntimeError("the engine was terminated"))
            self.reset_prefix_cache()
            return False
        return True

    def request_prefix_cache_reset(self) -> threading.Event:
        """From another thread: drop every cached sequence; the event is set when done."""
        done = threading.Event()
        self.inbox.put(("reset_prefix_cache", done))
        return done

    def reset_prefix_cache(self) -> None:
        """Drop every cached (finished) sequence's KV. Running requests keep theirs."""
        if self.prefix_cache is None:
            return
        while (seq_id := self.prefix_cache.evict()) is not None:
            self.runner.remove_sequence(self.cache, seq_id)
        self._publish_gauges()

    def state(self) -> policy.SchedulerState:
        pc = self.prefix_cache
        return policy.SchedulerState(
            self.cfg, list(self.waiting), self.running, self.runner.num_available_pages(self.cache),
            recycled=list(pc.recycled) if pc else [], match=pc.match if pc else (lambda tokens: (0, None)),
            prefilled_last=self._prefilled_last, propose=self._propose,
            step_costs=self._step_costs)

    def step(self) -> None:
        while (action := policy.admission_action(self.state())) is not None:
            self._apply(action)
        while (action := policy.forward_action(self.state())) is not None:
            self._apply(action)
            if not isinstance(action, (policy.Evict, policy.Preempt)):
                self._prefilled_last = isinstance(action, policy.Prefill)
                return

    def _apply(self, action) -> None:
        if isinstance(action, policy.Evict):
            self.prefix_cache.forget(action.seq_id)
            self.runner.remove_sequence(self.cache, action.seq_id)
            with self._lock:
                self.stats["prefix_cache_evictions"] += 1
        elif isinstance(action, policy.Admit):
            self._admit(action)
        elif isinstance(action, policy.Fork):
            self._fork(action)
        elif isinstance(action, policy.Preempt):
            self._preempt(action.req)
        elif isinstance(action, policy.EndLength):
            for r, s in action.rows:  # one request alone does not fit: the KV cache is full
                self._finish_seq(r, s, "length")
        elif isinstance(action, policy.Prefill):
            self._prefill(action.batch)
        elif isinstance(action, policy.Decode):
            if any(action.drafts):
                self._verify(action.rows, action.drafts)
            else:
                self._decode(action.rows)
        else:
            raise TypeError(f"unknown scheduler action {action!r}")

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id - 1

    # ---- admission --------------------------------------------------------------------------------------------------
    def _admit(self, action: policy.Admit) -> None:
        req = action.req
        self.waiting.remove(req)
        first = req.admitted_at < 0
        taken: dict[int, int] = {}  # recycled sequences taken over by an earlier choice -> tokens kept
        for s, n, src in action.reuse:
            if src in taken:
                n = min(n, taken[src])
            if src is not None and self.prefix_cache.is_recycled(src):  # take the cached sequence over
                held = len(self.prefix_cache.take(src))
                s.seq_id = src
                taken[src] = n
                if held > n:
                    self.runner.popn(self.cache, src, held - n)
            elif src is not None:  # share a running sequence's KV
                s.seq_id = self._new_seq_id()
                self.runner.fork_sequence(self.cache, src, s.seq_id, n)
            else:
                s.seq_id = self._new_seq_id()
                self.runner.add_sequence(self.cache, s.seq_id)
            s.kv_len = n
            if n and self.prefix_cache is not None:
                self.prefix_cache.index(s.seq_id, s.tokens[:n])
        if first:
            req.cached_tokens = action.reuse[0][1] if action.reuse else 0
            with self._lock:
                self.stats["prefix_cache_prompt_tokens"] += len(req.prompt)
                self.stats["prefix_cache_hit_tokens"] += req.cached_tokens
        req.admitted_at = self._admissions
        self._admissions += 1
        self.running.append(req)

    def _fork(self, action: policy.Fork) -> None:
        req = action.req
        for _ in range(action.count):
            child = req.fork(req.gen.n - req.unforked)
            child.seq_id = self._new_seq_id()
            if action.parent is not None:
                self.runner.fork_sequence(self.cache, action.parent.seq_id, child.seq_id, action.keep)
                child.kv_len = action.keep
            else:
                self.runner.add_sequence(self.cache, child.seq_id)
            req.unforked -= 1

    # ---- prefill --------------------------------------------------------------------------------------------------
    def _prefill(self, plan: list[tuple[Request, Sequence, int]]) -> None:
        batch = [(req, s, s.pending[:n]) for req, s, n in plan]
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
                if self.prefix_cache is not None:  # later requests may fork this prompt's KV
                    self.prefix_cache.index(s.seq_id, s.tokens)
        if ready:
            self._sample_and_commit(logits[ready_rows], ready)

    # ---- decode ---------------------------------------------------------------------------------------------------
    def _decode(self, seqs: list[tuple[Request, Sequence]]) -> None:
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
        self._count_decode(len(seqs), len(seqs), elapsed)
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
        if self._propose is not None:
            self._cost_key = ("decode", len(seqs), len(seqs))
            self._drift([s for _, s in seqs])

    def _record_cost(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        """Running average of the engine loop's turns by the step they ran (forward, sampling, delivery, gauges),
        which the policy weighs speculation by."""
        key = (kind, rows, tokens)
        old = self._step_costs.get(key)
        self._step_costs[key] = seconds if old is None else 0.7 * old + 0.3 * seconds

    @staticmethod
    def _drift(seqs: list[Sequence]) -> None:
        """Sequences that did not draft this step drift back towards the prior, so that they try again later."""
        for s in seqs:
            if s.spec_accept is not None:
                s.spec_accept += 0.02 * (policy.ACCEPT_PRIOR - s.spec_accept)

    def _count_decode(self, rows: int, tokens: int, elapsed: float) -> None:
        with self._lock:
            self.stats["decode_tokens"] += tokens
            self.stats["decode_time_s"] += elapsed
            self.stats["decode_steps"] += 1
            self.stats["decode_batch_sizes"][rows] += 1
            self.stats["decode_time_by_batch_size"][rows] += elapsed

    def _verify(self, seqs: list[tuple[Request, Sequence]], drafts: list[list[int]]) -> None:
        """One batch_verify of each row's last token + drafts. Position j of a row is sampled (its own sampler,
        penalties and grammar as they stand after positions < j) and committed; the row goes on to j+1 while the
        sampled token equals draft j. Afterwards the KV of the rejected drafts is popped."""
        start = time.perf_counter()
        if any(policy.DRAFTED_LATER in d for d in drafts):
            drafts = self.runner.propose(self.cache, [s.seq_id for _, s in seqs], [s.pending[0] for _, s in seqs],
                                         [len(d) for d in drafts], self.cfg.prefill_chunk_size)
            with self._lock:
                self.stats["spec_draft_time_s"] += time.perf_counter() - start
        inputs = [[s.pending[0]] + d for (_, s), d in zip(seqs, drafts)]
        logits = self.runner.batch_verify(self.cache, [s.seq_id for _, s in seqs], inputs)
        elapsed = time.perf_counter() - start
        offsets = np.cumsum([0] + [len(t) for t in inputs])
        for (_, s), t in zip(seqs, inputs):
            s.kv_len += len(t)  # the rejected tail is popped below (or when the sequence is released)
        host_start = time.perf_counter()
        active = list(range(len(seqs)))
        committed, accepted = 0, [0] * len(seqs)
        j = 0
        while active:
            before = [len(seqs[i][1].tokens) for i in active]
            self._sample_and_commit(logits[[offsets[i] + j for i in active]], [seqs[i] for i in active])
            nxt = []
            for i, n0 in zip(active, before):
                s = seqs[i][1]
                if len(s.tokens) == n0:  # its request ended while sampling
                    continue
                committed += 1
                if j < len(drafts[i]) and s.tokens[-1] == drafts[i][j]:
                    accepted[i] += 1
                    if not s.finished:
                        nxt.append(i)
            active, j = nxt, j + 1
        for _, s in seqs:
            if s.seq_id is not None:
                self._trim_kv(s)
        for (_, s), d, a in zip(seqs, drafts, accepted):
            if d:
                prev = policy.ACCEPT_PRIOR if s.spec_accept is None else s.spec_accept
                s.spec_accept = 0.5 * prev + 0.5 * a / len(d)
        self._drift([s for (_, s), d in zip(seqs, drafts) if not d])
        proposed = sum(len(d) for d in drafts)
        self._count_decode(len(seqs), committed, elapsed)
        self._cost_key = ("verify", len(seqs), sum(len(t) for t in inputs))
        with self._lock:
            self.stats["spec_draft_tokens"] += proposed
            self.stats["spec_accepted_tokens"] += sum(accepted)
            self.stats["spec_verify_rows"] += sum(bool(d) for d in drafts)
            self.stats["decode_host_time_s"] += time.perf_counter() - host_start

    def _trim_kv(self, s: Sequence) -> None:
        """Pop KV entries past the sequence's tokens but its last (rejected drafts, or drafts accepted after the
        sequence finished)."""
        extra = s.kv_len - (len(s.tokens) - 1)
        if extra > 0:
            self.runner.popn(self.cache, s.seq_id, extra)
            s.kv_len -= extra

    def _preempt(self, req: Request) -> None:
        for s in req.seqs:
            self._release(s, keep=False)
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

    def _release(self, s: Sequence, keep: bool = True) -> None:
        """The sequence gives up its KV: into the prefix cache (keep, when on) or freed at once."""
        if s.seq_id is None:
            return
        if keep and self.prefix_cache is not None and s.kv_len > 0:
            self._trim_kv(s)
            for seq_id in self.prefix_cache.recycle(s.seq_id, s.tokens[:s.kv_len]):
                self.runner.remove_sequence(self.cache, seq_id)
        else:
            if self.prefix_cache is not None:
                self.prefix_cache.forget(s.seq_id)
            self.runner.remove_sequence(self.cache, s.seq_id)  # frees its KV pages at once
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
                self._release(s, keep=error is None)  # after an error the KV may not hold what the tokens say
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
