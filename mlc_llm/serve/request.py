"""Engine-side state of a request and of each of its sequences (one per choice)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ..tokenizer import StopStrMatcher, TextStreamer, Tokenizer
from .sampler import Sampled, SamplingParams


@dataclass
class GenerationConfig:
    sampling: SamplingParams
    n: int = 1
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: Optional[int] = None
    grammar: Any = None  # grammar.Grammar: each sequence gets its own matcher


@dataclass
class Delta:
    """New output of one choice: text (possibly empty), the tokens' logprobs, and the finish reason when done."""
    index: int
    text: str
    logprobs: list[tuple[Sampled, str]] = field(default_factory=list)  # (sample, token text)
    finish_reason: Optional[str] = None


@dataclass
class Done:
    usage: dict[str, Any]


@dataclass
class Failed:
    error: BaseException


class RequestTimeout(RuntimeError):
    """The request ran (queue included) past its time limit; it was ended and its KV freed."""


class Sequence:
    def __init__(self, index: int, tokens: list[int], num_prompt: int, tokenizer: Tokenizer, gen: GenerationConfig,
                 rng: np.random.Generator):
        self.index = index
        self.tokens = tokens  # prompt + generated
        self.num_prompt = num_prompt
        self.seq_id: Optional[int] = None  # KV-cache sequence id while it has one
        self.kv_len = 0  # tokens of `tokens` already in the KV cache
        self.counts: dict[int, int] = {}
        self.rng = rng
        self.streamer = TextStreamer(tokenizer)
        self.stopper = StopStrMatcher(gen.stop)
        self.matcher = gen.grammar.matcher() if gen.grammar is not None else None  # llguidance.LLMatcher
        self.finish_reason: Optional[str] = None
        self.spec_accept: Optional[float] = None  # running share of this sequence's draft tokens accepted

    @property
    def pending(self) -> list[int]:
        return self.tokens[self.kv_len:]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Request:
    def __init__(self, request_id: str, prompt: list[int], gen: GenerationConfig, tokenizer: Tokenizer,
                 sink: Callable[[Any], None]):
        self.id = request_id
        self.prompt = prompt
        self.gen = gen
        self.sink = sink
        self.tokenizer = tokenizer
        seed = gen.seed if gen.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self._seed = seed
        self.seqs = [self._new_seq(0, list(prompt))]
        self.unforked = gen.n - 1  # choices 1..n-1 fork choice 0's KV once the prompt is in
        self.arrival = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.prefill_tokens = 0  # including re-prefill after preemption
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.admitted_at = -1  # admission order, for choosing whom to preempt
        self.deadline: Optional[float] = None  # perf_counter time after which the engine ends it (RequestTimeout)

    def _new_seq(self, index: int, tokens: list[int]) -> Sequence:
        rng = np.random.Generator(np.random.PCG64([self._seed, index]))
        return Sequence(index, tokens, len(self.prompt), self.tokenizer, self.gen, rng)

    def fork(self, index: int) -> Sequence:
        s = self._new_seq(index, list(self.prompt))
        self.seqs.append(s)
        return s

    @property
    def finished(self) -> bool:
        return self.unforked == 0 and all(s.finished for s in self.seqs)

    def usage(self) -> dict[str, Any]:
        now = time.perf_counter()
        completion = sum(s.num_generated for s in self.seqs)
        ttft = (self.first_token_time - self.arrival) if self.first_token_time else None
        decode_time = now - self.first_token_time if self.first_token_time else 0.0
        decode_tokens = max(completion - len(self.seqs), 0)
        per_seq = max(s.num_generated for s in self.seqs) - 1  # tokens after the first, in the longest choice
        extra = {"ttft_s": ttft, "end_to_end_latency_s": now - self.arrival, "prefill_tokens": self.prefill_tokens,
                 "tpot_s": decode_time / per_seq if per_seq > 0 else None,
                 "decode_tokens_per_s": decode_tokens / decode_time if decode_time > 0 else None,
                 "prefill_tokens_per_s": self.prefill_tokens / ttft if ttft else None}
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}, "extra": extra}
