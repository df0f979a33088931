"""Prefix cache: which KV-cache sequences hold which token prefixes, so a new request forks the longest one and
prefills only the rest.

Two kinds of sequence are indexed: running ones (by the tokens already in their KV) and recycled ones — finished
sequences whose KV is kept in the paged cache until its pages are needed (LRU). A request that matches a recycled
sequence takes it over (its extra tail is popped), one that matches a running sequence forks it.
"""
from __future__ import annotations

import collections
from typing import Iterable, Optional


class _Node:
    __slots__ = ("edge", "children", "seqs", "parent")

    def __init__(self, edge: tuple[int, ...], parent: Optional["_Node"]):
        self.edge = edge
        self.children: dict[int, _Node] = {}
        self.seqs: set[int] = set()  # sequences whose indexed tokens run through the end of this edge
        self.parent = parent


def _common(a: tuple[int, ...], b: list[int], start: int) -> int:
    """Length of the common prefix of a and b[start:]."""
    n = min(len(a), len(b) - start)
    if tuple(b[start:start + n]) == a[:n]:
        return n
    i = 0
    while a[i] == b[start + i]:
        i += 1
    return i


class RadixTree:
    """Token-id radix tree; each node knows the sequences that hold its whole path."""

    def __init__(self):
        self.root = _Node((), None)
        self.tokens: dict[int, tuple[int, ...]] = {}  # seq id -> indexed tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def insert(self, seq_id: int, tokens: Iterable[int]) -> None:
        tokens = list(tokens)
        if seq_id in self.tokens:
            self.remove(seq_id)
        self.tokens[seq_id] = tuple(tokens)
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = _Node(tuple(tokens[i:]), node)
                node.children[tokens[i]] = child
            else:
                n = _common(child.edge, tokens, i)
                if n < len(child.edge):  # split the edge where the tokens leave it
                    mid = _Node(child.edge[:n], node)
                    mid.seqs = set(child.seqs)
                    node.children[tokens[i]] = mid
                    child.edge = child.edge[n:]
                    child.parent = mid
                    mid.children[child.edge[0]] = child
                    child = mid
            child.seqs.add(seq_id)
            i += len(child.edge)
            node = child

    def remove(self, seq_id: int) -> None:
        tokens = self.tokens.pop(seq_id, None)
        if tokens is None:
            return
        node, i = self.root, 0
        path = []
        while i < len(tokens):
            node = node.children[tokens[i]]
            node.seqs.discard(seq_id)
            path.append(node)
            i += len(node.edge)
        for node in reversed(path):  # a node no sequence holds has no held children either
            if not node.seqs:
                del node.parent.children[node.edge[0]]

    def match(self, tokens: list[int]) -> tuple[int, set[int]]:
        """(length of the longest indexed prefix of tokens, the sequences holding it)."""
        node, i = self.root, 0
        best: tuple[int, set[int]] = (0, set())
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _common(child.edge, tokens, i)
            i += n
            best = (i, child.seqs)
            if n < len(child.edge):
                break
            node = child
        return best


class PrefixCache:
    """The radix tree plus the LRU list of recycled sequences (whose KV the engine keeps)."""

    def __init__(self, max_recycled: int):
        self.tree = RadixTree()
        self.max_recycled = max_recycled  # -1: no limit
        self.recycled: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first

    def match(self, tokens: list[int]) -> tuple[int, Optional[int]]:
        """(matched length, the sequence to reuse), preferring a recycled sequence (taken over, no copy)."""
        n, seqs = self.tree.match(tokens)
        if not n:
            return 0, None
        recycled = [s for s in seqs if s in self.recycled]
        return n, (recycled[0] if recycled else min(seqs))

    def index(self, seq_id: int, tokens: Iterable[int]) -> None:
        """A running sequence now holds these tokens in its KV."""
        self.tree.insert(seq_id, tokens)

    def forget(self, seq_id: int) -> None:
        """The sequence's KV is gone or no longer matches its indexed tokens."""
        self.tree.remove(seq_id)
        self.recycled.pop(seq_id, None)

    def take(self, seq_id: int) -> tuple[int, ...]:
        """A recycled sequence now belongs to a request: out of the LRU list (the caller re-indexes it)."""
        self.recycled.pop(seq_id)
        return self.tree.tokens[seq_id]

    def recycle(self, seq_id: int, tokens: Iterable[int]) -> list[int]:
        """Keep a finished sequence's KV; returns the sequences over the limit, to be removed from the KV cache."""
        self.tree.insert(seq_id, tokens)
        self.recycled[seq_id] = None
        evicted = []
        while 0 <= self.max_recycled < len(self.recycled):
            evicted.append(self.evict())
        return evicted

    def evict(self, keep: Optional[int] = None) -> Optional[int]:
        """Drop the least recently used recycled sequence (not `keep`); the caller removes it from the KV cache."""
        for seq_id in self.recycled:
            if seq_id != keep:
                self.forget(seq_id)
                return seq_id
        return None

    def is_recycled(self, seq_id: int) -> bool:
        return seq_id in self.recycled
