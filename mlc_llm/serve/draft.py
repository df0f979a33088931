"""Speculative decoding with a small draft model: a runner pair that looks like one ModelRunner to the engine.

Every KV operation (add, remove, fork, popn) is done on both models' caches, so the draft's KV always holds a prefix
of the target's tokens (the prefix cache, forks and preemption keep working unchanged). Prefill chunks go to both
models; decode and verify tokens only to the target, and the draft catches up (one or two tokens) when it drafts.
Drafts are the draft model's argmax: a deterministic draft, which the engine verifies exactly for any sampling
settings (speculative.py).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .runner import ModelRunner

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def _tokenizer_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = model_dir / name
        if p.exists():
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def check_draft(target: ModelRunner, draft: ModelRunner) -> None:
    """A draft must speak the target's tokens: same vocabulary size and the same tokenizer files."""
    if draft.task != "chat":
        raise ValueError(f"the draft model '{draft.model_dir}' is an {draft.task} model, not a text generator")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"the draft model '{draft.model_dir}' has a vocabulary of {draft.vocab_size} tokens, the "
                         f"model {target.vocab_size}: a draft must use the model's tokenizer")
    if _tokenizer_digest(draft.model_dir) != _tokenizer_digest(target.model_dir):
        raise ValueError(f"the draft model '{draft.model_dir}' has a different tokenizer from the model's "
                         f"('{target.model_dir}'): a draft must use the model's tokenizer")


class DraftPair:
    def __init__(self, target: ModelRunner, draft: ModelRunner):
        check_draft(target, draft)
        self.target, self.draft = target, draft
        self.content: dict[int, list[int]] = {}  # seq id -> the tokens in the target's KV
        self.draft_len: dict[int, int] = {}  # seq id -> how many of them the draft's KV holds

    def __getattr__(self, name):  # vocab_size, device, metadata, has_device_sampler, sample_on_device, ...
        return getattr(self.target, name)

    # ---- KV cache, on both --------------------------------------------------------------------------------------
    def create_kv_cache(self, max_batch_size: int, max_total_seq_len: int, prefill_chunk_size=None, page_size=16):
        return (self.target.create_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size),
                self.draft.create_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size))

    def num_available_pages(self, cache) -> int:
        return min(self.target.num_available_pages(cache[0]), self.draft.num_available_pages(cache[1]))

    def add_sequence(self, cache, seq_id: int) -> None:
        self.target.add_sequence(cache[0], seq_id)
        self.draft.add_sequence(cache[1], seq_id)
        self.content[seq_id], self.draft_len[seq_id] = [], 0

    def remove_sequence(self, cache, seq_id: int) -> None:
        self.target.remove_sequence(cache[0], seq_id)
        self.draft.remove_sequence(cache[1], seq_id)
        del self.content[seq_id], self.draft_len[seq_id]

    def fork_sequence(self, cache, parent: int, child: int, fork_pos: int = -1) -> None:
        pos = len(self.content[parent]) if fork_pos == -1 else fork_pos
        self.target.fork_sequence(cache[0], parent, child, pos)
        draft_pos = min(pos, self.draft_len[parent])
        if draft_pos > 0:
            self.draft.fork_sequence(cache[1], parent, child, draft_pos)
        else:
            self.draft.add_sequence(cache[1], child)
        self.content[child], self.draft_len[child] = self.content[parent][:pos], draft_pos

    def popn(self, cache, seq_id: int, n: int) -> None:
        self.target.popn(cache[0], seq_id, n)
        del self.content[seq_id][len(self.content[seq_id]) - n:]
        extra = self.draft_len[seq_id] - len(self.content[seq_id])
        if extra > 0:
            self.draft.popn(cache[1], seq_id, extra)
            self.draft_len[seq_id] -= extra

    def release_pool(self) -> None:
        self.target.release_pool()
        self.draft.release_pool()

    # ---- forward ----------------------------------------------------------------------------------------------
    def batch_prefill(self, cache, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        logits = self.target.batch_prefill(cache[0], seq_ids, token_lists)
        synced = [i for i, s in enumerate(seq_ids) if self.draft_len[s] == len(self.content[s])]
        if synced:  # the draft takes the same chunk (one that lags catches up when it drafts)
            self.draft.batch_prefill(cache[1], [seq_ids[i] for i in synced], [token_lists[i] for i in synced])
        for i, (s, toks) in enumerate(zip(seq_ids, token_lists)):
            self.content[s].extend(toks)
            if i in synced:
                self.draft_len[s] += len(toks)
        return logits

    def batch_decode(self, cache, seq_ids: Sequence[int], tokens: Sequence[int], to_host: bool = True):
        out = self.target.batch_decode(cache[0], seq_ids, tokens, to_host)
        for s, t in zip(seq_ids, tokens):
            self.content[s].append(t)
        return out

    def batch_verify(self, cache, seq_ids: Sequence[int], token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        logits = self.target.batch_verify(cache[0], seq_ids, token_lists)
        for s, toks in zip(seq_ids, token_lists):
            self.content[s].extend(toks)
        return logits

    def propose(self, cache, seq_ids: Sequence[int], next_tokens: Sequence[int], lengths: Sequence[int],
                chunk: int) -> list[list[int]]:
        """Up to lengths[i] draft tokens after each sequence's KV + next_tokens[i] (its pending token)."""
        drafts: list[list[int]] = [[] for _ in seq_ids]
        rows = [i for i, k in enumerate(lengths) if k > 0]
        feed = {i: self.content[seq_ids[i]][self.draft_len[seq_ids[i]]:] + [next_tokens[i]] for i in rows}
        while rows:
            # the draft catches up on what it has not seen (in chunks of at most `chunk` tokens per call)
            batch, total = [], 0
            for i in rows:
                n = min(len(feed[i]), chunk)
                if batch and total + n > chunk:
                    break
                batch.append(i)
                total += n
            inputs = [feed[i][:chunk] for i in batch]
            logits = self.draft.batch_prefill(cache[1], [seq_ids[i] for i in batch], inputs)
            for i, toks, row in zip(batch, inputs, logits):
                self.draft_len[seq_ids[i]] += len(toks)
                feed[i] = feed[i][len(toks):]
                if not feed[i]:
                    drafts[i].append(int(np.argmax(row)))
            rows = [i for i in rows if feed[i]]
        active = [i for i, k in enumerate(lengths) if k > 1]
        while active:
            ids = [seq_ids[i] for i in active]
            logits = self.draft.batch_decode(cache[1], ids, [drafts[i][-1] for i in active])
            for i, row in zip(active, logits):
                self.draft_len[seq_ids[i]] += 1
                drafts[i].append(int(np.argmax(row)))
            active = [i for i in active if len(drafts[i]) < lengths[i]]
        return drafts
