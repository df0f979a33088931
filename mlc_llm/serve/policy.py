"""The scheduler's decisions, as pure functions of a snapshot of the engine's state (no model, no KV cache).

EngineCore (scheduler.py) asks, in each step, for admission actions until there are none, then for the step's work:
    admission_action(state) -> Evict | Admit | Fork | None
    forward_action(state)   -> Evict | Preempt | EndLength | Prefill | Decode | None
and carries each action out (an eviction or preemption changes the free pages, so it asks again). Tests drive these
functions with hand-made states and a fake page budget.

Policy, in short: admission is FIFO while sequence slots, pages and total length allow, each sequence reusing the
longest cached prefix of its tokens; recycled (cached) sequences are evicted LRU before any running request is
preempted; prefill and decode steps alternate while both have work; a prefill takes the shortest remaining prompts
first and caps one prompt's chunk at `long_prefill_token_threshold` while others run or wait; when decode has no
pages, the most recently admitted request is preempted; drafts (speculative decoding) are dropped before that, and
in the auto mode drafted only to the length that gives the most expected tokens per measured second.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .config import ResolvedConfig
from .request import Request, Sequence


@dataclass
class SchedulerState:
    cfg: ResolvedConfig
    waiting: list[Request]
    running: list[Request]
    free_pages: int
    recycled: list[int] = field(default_factory=list)  # cached sequences, least recently used first
    # tokens -> (length of the longest cached prefix, the sequence holding it)
    match: Callable[[list[int]], tuple[int, Optional[int]]] = lambda tokens: (0, None)
    prefilled_last: bool = False  # the previous step was a prefill
    # (a running sequence, k) -> at most k draft tokens to verify (speculative decoding), or DRAFTED_LATER per token
    # the draft model proposes at run time; None: no speculation
    propose: Optional[Callable[[Sequence, int], list[int]]] = None
    # ("decode" | "verify", rows, tokens) -> the measured seconds of such a step
    step_costs: dict[tuple[str, int, int], float] = field(default_factory=dict)

    def running_seqs(self) -> list[Sequence]:
        return [s for r in self.running for s in r.seqs if not s.finished]

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.cfg.page_size)

    def pages_to_grow(self, kv_len: int, n_tokens: int) -> int:
        """At most how many free pages appending n_tokens to a sequence of kv_len takes: its partly filled last page
        counts as new (it may be shared with a fork, and is then copied before it is written)."""
        return self.pages_for(kv_len + n_tokens) - kv_len // self.cfg.page_size


# ---- actions ------------------------------------------------------------------------------------------------------
@dataclass
class Evict:
    seq_id: int  # a recycled sequence, dropped from the prefix cache and the KV cache


@dataclass
class Admit:
    req: Request
    reuse: list[tuple[Sequence, int, Optional[int]]]  # per live sequence: (it, cached tokens reused, source seq id)


@dataclass
class Fork:
    req: Request
    parent: Optional[Sequence]  # None: the new choice prefills the prompt itself
    count: int
    keep: int  # prompt tokens shared with the parent


@dataclass
class Preempt:
    req: Request


@dataclass
class EndLength:
    rows: list[tuple[Request, Sequence]]  # the KV cache cannot hold even one request: finish with "length"


@dataclass
class Prefill:
    batch: list[tuple[Request, Sequence, int]]  # (request, sequence, tokens of its pending ones to prefill)


DRAFTED_LATER = -1  # a draft token the draft model proposes when the step runs


@dataclass
class Decode:
    rows: list[tuple[Request, Sequence]]
    drafts: list[list[int]]  # per row; all empty: a plain decode step


# ---- admission ----------------------------------------------------------------------------------------------------
def admission_action(st: SchedulerState):
    """The next admission-phase action: an eviction that lets the head of the queue in, its admission, or a fork of
    choices 2..n; None when nothing more can happen before the forward step."""
    if st.waiting:
        req = st.waiting[0]
        live = [s for s in req.seqs if not s.finished]
        seqs_after = len(st.running_seqs()) + len(live)
        if seqs_after <= st.cfg.max_num_sequence:
            reuse = []
            for s in live:  # at least the last token is prefilled: its logits start the generation
                n, src = st.match(s.tokens[:len(s.tokens) - 1])
                reuse.append((s, n, src) if n > 0 else (s, 0, None))
            # the prompt's pages, plus one page per running sequence for its next decode
            pages_needed = sum(st.pages_to_grow(n, len(s.tokens) - n) for s, n, _ in reuse) + seqs_after
            kv_tokens = sum(s.kv_len for s in st.running_seqs())
            fits_length = kv_tokens + sum(len(s.tokens) for s in live) + 8 * seqs_after \
                <= st.cfg.max_total_sequence_length
            if not st.running or (fits_length and pages_needed <= st.free_pages):
                return Admit(req, reuse)
            sources = {src for _, _, src in reuse}
            victim = next((sid for sid in st.recycled if sid not in sources), None)
            if victim is not None and fits_length:
                return Evict(victim)
    return _fork_action(st)


def _fork_action(st: SchedulerState) -> Optional[Fork]:
    """Choices 2..n fork a sibling's KV up to the prompt's last token (the next decode step reads it, so each choice
    samples its first token itself), or prefill the prompt again when no sibling holds it. While other requests
    wait, one request keeps at most half the sequence slots."""
    share = max(1, st.cfg.max_num_sequence // 2)
    used = len(st.running_seqs())
    for req in st.running:
        if not req.unforked:
            continue
        live = [s for s in req.seqs if not s.finished and s.seq_id is not None]
        keep = len(req.prompt) - 1
        parent = next((s for s in live if s.kv_len >= keep), None) if keep > 0 else None
        if parent is None and live:
            continue  # the prompt is still being prefilled
        free = st.cfg.max_num_sequence - used
        if st.waiting:
            free = min(free, share - len(live))
        count = min(req.unforked, free)
        if count > 0:
            return Fork(req, parent, count, keep if parent is not None else 0)
    return None


# ---- the step's work ----------------------------------------------------------------------------------------------
def forward_action(st: SchedulerState):
    order = (_decode_action, _prefill_action) if st.prefilled_last else (_prefill_action, _decode_action)
    for choose in order:
        action = choose(st)
        if action is not None:
            return action
    return None


def _prefill_action(st: SchedulerState) -> Optional[Prefill]:
    todo = [(req, s) for req in st.running for s in req.seqs
            if not s.finished and len(s.pending) > 1 and s.seq_id is not None]
    todo.sort(key=lambda rs: len(rs[1].pending))  # shortest remaining prompt first
    busy = len(todo) > 1 or bool(st.waiting) or any(len(s.pending) == 1 for s in st.running_seqs())
    cap = (busy and st.cfg.long_prefill_token_threshold) or st.cfg.prefill_chunk_size
    budget, free, ps = st.cfg.prefill_chunk_size, st.free_pages, st.cfg.page_size
    batch: list[tuple[Request, Sequence, int]] = []
    for req, s in todo:
        if budget <= 0:
            break
        fits = (free + s.kv_len // ps) * ps - s.kv_len  # tokens the free pages take
        n = min(budget, cap, len(s.pending), fits)
        if n <= 0 or (batch and n < len(s.pending) and busy):
            break  # short prompts finish in a step of their own, not behind a long one's chunk
        budget -= n
        free -= st.pages_to_grow(s.kv_len, n)
        batch.append((req, s, n))
    if batch:
        return Prefill(batch)
    if not todo:
        return None
    return _make_room(st, [(req, s) for req, s in todo])


def _make_room(st: SchedulerState, rows: list[tuple[Request, Sequence]]):
    """No pages for the step: drop a cached sequence, else preempt the newest request, else (one request alone
    does not fit) end its sequences with "length"."""
    if st.recycled:
        return Evict(st.recycled[0])
    if len(st.running) > 1:
        return Preempt(max(st.running, key=lambda r: r.admitted_at))
    return EndLength(rows)


def _decode_action(st: SchedulerState):
    rows = [(r, s) for r in st.running for s in r.seqs if not s.finished and len(s.pending) == 1]
    if not rows:
        return None
    if len(rows) > st.free_pages:  # one new page per sequence at most
        return _make_room(st, rows)
    drafts = [[] for _ in rows]
    if st.propose is not None and st.cfg.spec_draft_length > 0:
        drafts = _plan_drafts(st, rows)
        if st.cfg.spec_adaptive:
            drafts = _worth_it(st, rows, drafts)
    return Decode(rows, drafts)


# A sequence's acceptance rate before it has verified drafts, and what a sequence that stopped drafting drifts back
# to (so it tries again now and then).
ACCEPT_PRIOR = 0.7


def expected_tokens(accept: float, k: int) -> float:
    """Tokens one verify step of k drafts commits, if each draft is kept with probability `accept`: 1 + a + ... + a^k
    (the sampled token always; draft j only if drafts 1..j all are)."""
    return sum(accept ** j for j in range(k + 1))


def _worth_it(st: SchedulerState, rows: list[tuple[Request, Sequence]], drafts: list[list[int]]) -> list[list[int]]:
    """The drafts (or a shorter prefix of each) that give the most tokens per second, or none if a plain decode step
    gives more: expected tokens from each row's acceptance rate, step times from st.step_costs (measured by the
    engine; see _verify_cost for the ones not measured yet)."""
    b = len(rows)
    decode = st.step_costs.get(("decode", b, b))
    if decode is None or not any(drafts):
        return [[] for _ in rows]
    measured = sorted((t, c) for (kind, r, t), c in st.step_costs.items() if kind == "verify" and r == b)
    best, best_rate = [[] for _ in rows], b / decode
    for cap in range(1, max(len(d) for d in drafts) + 1):
        trial = [d[:cap] for d in drafts]
        tokens = b + sum(len(d) for d in trial)
        cost = _verify_cost(measured, tokens, decode, b)
        gain = sum(expected_tokens(ACCEPT_PRIOR if s.spec_accept is None else s.spec_accept, len(d))
                   for (_, s), d in zip(rows, trial))
        if gain / cost > best_rate * 1.05:  # a clear win only: a verify step costs more than its estimate suggests
            best, best_rate = trial, gain / cost
    return best


def _verify_cost(measured: list[tuple[int, float]], tokens: int, decode: float, rows: int) -> float:
    """Seconds of a verify step of `tokens` tokens over `rows` sequences: measured, else the nearest measured one
    with fewer tokens scaled by the square root of the ratio (kernels take a few rows for nearly the price of one:
    optimistic enough to be tried, and then measured), or one with more as is, else a guess of half a decode step
    per token per row."""
    for t, cost in measured:
        if t == tokens:
            return cost
    below = [(t, c) for t, c in measured if t < tokens]
    if below:
        t, cost = below[-1]
        return cost * (tokens / t) ** 0.5
    if measured:
        return measured[0][1]
    return decode * max(1.0, 0.5 * tokens / rows)


def _plan_drafts(st: SchedulerState, rows: list[tuple[Request, Sequence]]) -> list[list[int]]:
    """Draft tokens per row, within the request's max_tokens, the sequence length limit, the prefill chunk (one
    verify step's tokens) and the free pages; drafts are never a reason to evict or preempt."""
    cfg = st.cfg
    spare_pages = st.free_pages - len(rows)
    budget = cfg.prefill_chunk_size - len(rows)
    out = []
    for req, s in rows:
        k = min(cfg.spec_draft_length, req.gen.max_tokens - s.num_generated - 1,
                cfg.max_single_sequence_length - len(s.tokens) - 1, budget)
        draft = st.propose(s, k) if k > 0 else []
        extra = st.pages_to_grow(s.kv_len, 1 + len(draft)) - 1 if draft else 0  # beyond the page kept for it
        if extra > spare_pages:
            draft = []
        spare_pages -= extra
        budget -= len(draft)
        out.append(draft)
    return out
