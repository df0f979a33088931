"""Logits of a whole batch -> next tokens, in one vectorized pass (numpy).

Order per row: presence/frequency penalty (logit -= presence + count·frequency), repetition penalty (divide positive
logits, multiply negative ones), logit bias, then greedy argmax (temperature 0) or temperature → top-k → softmax →
min-p → top-p → a draw from the row's own generator, so a seeded request samples the same whether batched or alone.
Rows with a grammar matcher get their disallowed tokens set to -inf after penalties and bias.
Logprobs are those of the model's distribution (log-softmax of the raw logits), as vLLM returns by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The model library's sampling functions (compiler/sampling.py); `on_device` says which rows they can take.
DEVICE_SAMPLING_FUNCTIONS = ("sample_greedy", "sample_top_p")


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0 or self.repetition_penalty != 1.0


def on_device(p: SamplingParams, constrained: bool) -> bool:
    """Whether the library's sampler takes this row: temperature and top_p only (no penalties, bias, top-k, min-p,
    grammar or top logprobs, which the host sampler applies)."""
    return not (constrained or p.penalized or p.logit_bias or 1 < p.top_k or p.min_p > 0 or p.top_logprobs)


@dataclass
class SampleRow:
    """What the sampler needs of one sequence."""
    params: SamplingParams
    rng: np.random.Generator
    counts: dict[int, int]  # generated token -> times
    matcher: Any = None  # llguidance.LLMatcher of a grammar-constrained sequence
    allowed: Any = None  # its token mask (bool [vocab]) when computed ahead, during the forward pass


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _apply_penalties_and_bias(x: np.ndarray, rows: list[SampleRow]) -> None:
    r_idx, t_idx, cnt, pres, freq, rep = [], [], [], [], [], []
    for i, row in enumerate(rows):
        p = row.params
        if p.penalized and row.counts:
            ids = np.fromiter(row.counts.keys(), np.int64, len(row.counts))
            r_idx.append(np.full(len(ids), i))
            t_idx.append(ids)
            cnt.append(np.fromiter(row.counts.values(), np.float32, len(row.counts)))
            pres.append(np.full(len(ids), p.presence_penalty, np.float32))
            freq.append(np.full(len(ids), p.frequency_penalty, np.float32))
            rep.append(np.full(len(ids), p.repetition_penalty, np.float32))
    if r_idx:
        r, t = np.concatenate(r_idx), np.concatenate(t_idx)
        v = x[r, t] - (np.concatenate(pres) + np.concatenate(cnt) * np.concatenate(freq))
        rp = np.concatenate(rep)
        x[r, t] = np.where(v > 0, v / rp, v * rp)
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = np.fromiter(row.params.logit_bias.keys(), np.int64)
            x[i, ids] += np.fromiter(row.params.logit_bias.values(), np.float32)


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


def _sample_row(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    x = logits / np.float32(p.temperature)
    if 0 < p.top_k < x.shape[0]:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x >= kth, x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.min_p > 0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_p = probs[order]
        cum = np.cumsum(sorted_p)
        keep = int(np.searchsorted(cum, p.top_p * cum[-1], side="left")) + 1  # smallest set reaching top_p
        return int(order[_draw(sorted_p[:keep], rng)])
    return _draw(probs, rng)


def device_inputs(rows: list[SampleRow]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(temperature, top_p, uniform) of rows that `on_device` accepted; greedy rows get temperature 0 and draw no
    number, so a seeded request's generator advances exactly as on the host."""
    temperature = np.array([0.0 if r.params.greedy else r.params.temperature for r in rows], np.float32)
    top_p = np.array([r.params.top_p for r in rows], np.float32)
    uniform = np.array([0.0 if r.params.greedy else r.rng.random() for r in rows], np.float32)
    return temperature, top_p, uniform


def sample_batch(logits: np.ndarray, rows: list[SampleRow]) -> list[Sampled]:
    """logits: float32 [batch, vocab] (not modified). Returns one Sampled per row."""
    want_lp = [i for i, r in enumerate(rows) if r.params.logprobs]
    logprobs = _log_softmax(logits[want_lp]) if want_lp else None
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    needs_copy = bool(constrained) or any(r.params.penalized or r.params.logit_bias for r in rows)
    x = logits.copy() if needs_copy else logits
    if needs_copy:
        _apply_penalties_and_bias(x, rows)
    if constrained:  # grammar masks (all missing ones in one parallel call), applied last
        from .grammar import allowed_tokens

        masks = {i: rows[i].allowed for i in constrained if rows[i].allowed is not None}
        missing = [i for i in constrained if i not in masks]
        if missing:
            masks.update(zip(missing, allowed_tokens([rows[i].matcher for i in missing], x.shape[1])))
        allowed = np.stack([masks[i] for i in constrained])
        x[constrained] = np.where(allowed, x[constrained], np.float32(-np.inf))
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    tokens = np.empty(len(rows), np.int64)
    if greedy:
        tokens[greedy] = np.argmax(x[greedy], axis=1)
    for i, r in enumerate(rows):
        if not r.params.greedy:
            tokens[i] = _sample_row(x[i], r.params, r.rng)
    out = [Sampled(int(t)) for t in tokens]
    for j, i in enumerate(want_lp):
        lp = logprobs[j]
        out[i].logprob = float(lp[tokens[i]])
        k = rows[i].params.top_logprobs
        if k:
            top = np.argpartition(-lp, k)[:k]
            top = top[np.argsort(-lp[top], kind="stable")]
            out[i].top = [(int(t), float(lp[t])) for t in top]
    return out
