"""A stand-in for ModelRunner with no model: next-token logits are a fixed function of the tokens a sequence's KV
holds (so a wrong prefix reuse or a bad rollback changes the output), and pages are accounted for as a paged KV cache
does (full pages shared between forks, a partly filled shared page copied before it is written)."""
from __future__ import annotations

import numpy as np

VOCAB = 97


def next_token(history: list[int]) -> int:
    """The fake model's greedy choice after `history` (its whole KV plus the token being fed)."""
    h = 7
    for t in history[-3:]:
        h = (h * 31 + t) % 1000003
    return (h + len(history)) % VOCAB


def draft_next_token(history: list[int]) -> int:
    """A fake draft model: the fake model's choice, but a different one after every third history length."""
    t = next_token(history)
    return (t + 1) % VOCAB if len(history) % 3 == 0 else t


def logits_after(history: list[int], rule=next_token) -> np.ndarray:
    """Peaked around rule(history): greedy picks it, sampling spreads over its neighbours."""
    target = rule(history)
    x = -np.abs(np.arange(VOCAB) - target).astype(np.float32)
    return x


class FakeKV:
    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.refs = [0] * num_pages
        self.seqs: dict[int, dict] = {}  # seq id -> {"tokens": [...], "pages": [...]}

    def free_pages(self) -> int:
        return self.refs.count(0)

    def _alloc(self) -> int:
        try:
            page = self.refs.index(0)
        except ValueError:
            raise RuntimeError("the KV cache is out of pages") from None
        self.refs[page] = 1
        return page

    def _drop(self, page: int) -> None:
        self.refs[page] -= 1
        assert self.refs[page] >= 0

    def append(self, seq_id: int, tokens: list[int]) -> None:
        s = self.seqs[seq_id]
        for t in tokens:
            n = len(s["tokens"])
            if n % self.page_size == 0:
                s["pages"].append(self._alloc())
            elif self.refs[s["pages"][-1]] > 1:  # copy on write
                old = s["pages"][-1]
                s["pages"][-1] = self._alloc()
                self._drop(old)
            s["tokens"].append(t)

    def truncate(self, seq_id: int, n: int) -> None:
        s = self.seqs[seq_id]
        keep_pages = -(-n // self.page_size)
        for page in s["pages"][keep_pages:]:
            self._drop(page)
        del s["pages"][keep_pages:]
        del s["tokens"][n:]


class _Device:
    @staticmethod
    def dlpack_device_type() -> int:
        return 1  # CPU


class FakeRunner:
    vocab_size = VOCAB
    device = _Device()
    has_device_sampler = False
    task = "chat"

    def __init__(self, fail_on_forward: int | None = None, rule=next_token, model_dir="."):
        from pathlib import Path

        self.rule = rule
        self.model_dir = Path(model_dir)
        self.metadata = {"max_batch_size": 64, "prefill_chunk_size": 4096}
        self.forwards = 0
        self.fail_on_forward = fail_on_forward  # the n-th forward pass (1-based) raises
        self.max_batch = 0
        self.calls: list[tuple[str, int]] = []  # (function, total tokens)

    # ---- KV cache ---------------------------------------------------------------------------------------------
    def create_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size=None, page_size=16):
        self.max_batch = max_batch_size
        return FakeKV(-(-max_total_seq_len // page_size), page_size)

    def num_available_pages(self, cache: FakeKV) -> int:
        return cache.free_pages()

    def add_sequence(self, cache: FakeKV, seq_id: int) -> None:
        assert seq_id not in cache.seqs, f"sequence {seq_id} exists"
        cache.seqs[seq_id] = {"tokens": [], "pages": []}

    def remove_sequence(self, cache: FakeKV, seq_id: int) -> None:
        cache.truncate(seq_id, 0)
        del cache.seqs[seq_id]

    def fork_sequence(self, cache: FakeKV, parent: int, child: int, fork_pos: int = -1) -> None:
        assert child not in cache.seqs, f"sequence {child} exists"
        p = cache.seqs[parent]
        pos = len(p["tokens"]) if fork_pos == -1 else fork_pos
        assert 0 < pos <= len(p["tokens"]), (pos, len(p["tokens"]))
        pages = p["pages"][:-(-pos // cache.page_size)]
        for page in pages:
            cache.refs[page] += 1
        cache.seqs[child] = {"tokens": p["tokens"][:pos], "pages": list(pages)}

    def popn(self, cache: FakeKV, seq_id: int, n: int) -> None:
        s = cache.seqs[seq_id]
        assert 0 <= n <= len(s["tokens"])
        cache.truncate(seq_id, len(s["tokens"]) - n)

    def release_pool(self) -> None:
        pass

    # ---- forward ----------------------------------------------------------------------------------------------
    def _forward(self, name: str, cache: FakeKV, seq_ids, token_lists, every_position: bool) -> np.ndarray:
        self.forwards += 1
        self.calls.append((name, sum(len(t) for t in token_lists)))
        if self.forwards == self.fail_on_forward:
            raise RuntimeError("injected forward failure")
        assert len(seq_ids) <= self.max_batch, "more sequences in one forward than the cache's max batch"
        assert len(set(seq_ids)) == len(seq_ids)
        rows = []
        for sid, toks in zip(seq_ids, token_lists):
            for i, t in enumerate(toks):
                cache.append(sid, [t])
                if every_position or i == len(toks) - 1:
                    rows.append(logits_after(cache.seqs[sid]["tokens"], self.rule))
        return np.stack(rows)

    def batch_prefill(self, cache, seq_ids, token_lists):
        return self._forward("prefill", cache, seq_ids, token_lists, False)

    def batch_decode(self, cache, seq_ids, tokens, to_host=True):
        return self._forward("decode", cache, seq_ids, [[t] for t in tokens], False)

    def batch_verify(self, cache, seq_ids, token_lists):
        return self._forward("verify", cache, seq_ids, token_lists, True)


class FakeTokenizer:
    """Enough of mlc_llm.tokenizer.Tokenizer for the engine: each token decodes to "<id>"."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(f"<{i}>" for i in ids)

    def token_text(self, i: int) -> str:
        return f"<{i}>"


def greedy_reference(prompt: list[int], max_tokens: int) -> list[int]:
    """What the fake model generates greedily, computed without the engine."""
    history = list(prompt)
    out = []
    for _ in range(max_tokens):
        t = next_token(history)
        out.append(t)
        history.append(t)
    return out
