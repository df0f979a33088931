"""Draft proposers for speculative decoding.

n-gram (prompt lookup): the last n tokens of a sequence are looked up earlier in its own tokens (prompt and output);
the tokens that followed the latest earlier occurrence are the draft. It needs no second model and pays off where
the output repeats its input: code edits, retrieval answers, summaries.

Verification (in the engine) samples each position from the target model with the sequence's own sampler and keeps
a draft token while it equals the sampled one. For a deterministic draft this is the rejection-sampling rule: the
draft token d is kept with probability p(d), and otherwise the token drawn is distributed as p without d,
renormalised; so the output follows the target's distribution (greedy: token-identical to plain decoding).
"""
from __future__ import annotations

import numpy as np

MODES = ("disable", "ngram", "small_draft")
MAX_DRAFT_LENGTH = 16


def ngram_propose(tokens: list[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to k tokens following the latest earlier occurrence of the longest suffix of `tokens` (max_n..min_n
    tokens long) found earlier in `tokens`; [] if none."""
    if k <= 0 or len(tokens) < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(arr) - 1), min_n - 1, -1):
        suffix = arr[-n:]
        # windows starting at 0 .. len-n-1 (the suffix's own position excluded)
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start:start + k]]
    return []
