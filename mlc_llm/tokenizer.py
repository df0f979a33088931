"""Tokenizer wrapper (`tokenizers`), streaming detokenizer, and stop-string matcher. Runtime side, no TVM."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as _HFTokenizer

REPLACEMENT = "\ufffd"


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        path = Path(model_dir) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in '{model_dir}' (run `mlc_llm gen_config`)")
        self._tok = _HFTokenizer.from_file(str(path))
        # a tokenizer.json may carry fixed padding / truncation (all-MiniLM's pads to 128): inputs are taken whole
        self._tok.no_padding()
        self._tok.no_truncation()
        cfg_path = Path(model_dir) / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
        jinja = Path(model_dir) / "chat_template.jinja"
        self.chat_template = jinja.read_text(encoding="utf-8") if jinja.exists() else self.config.get("chat_template")
        self.vocab_size = self._tok.get_vocab_size()
        # control tokens as text: "<|im_end|>" typed in a message must not end the turn
        self.special_strings = sorted({t.content for t in self._tok.get_added_tokens_decoder().values()
                                       if t.special and t.content}, key=len, reverse=True)
        self._as_text = _HFTokenizer.from_str(self._tok.to_str())
        self._as_text.encode_special_tokens = True

    def render_chat(self, messages: list[dict[str, str]], error: type[Exception] = ValueError) -> str:
        """`messages` through the model's own chat template (Jinja), ending with the assistant's turn opener; the
        template's `raise_exception` raises `error`."""
        if not self.chat_template:
            raise error("the model has neither a conversation template nor a tokenizer chat template")
        import jinja2

        def fail(msg):
            raise error(msg)

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = fail
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, bos_token=self.config.get("bos_token") or "",
            eos_token=self.config.get("eos_token") or "")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """`text` with any control-token strings in it tokenized as plain characters (user-written content)."""
        return self._as_text.encode(text, add_special_tokens=False).ids

    def encode_input(self, text: str) -> list[int]:
        """An encoder's input, with the special tokens its tokenizer adds ([CLS] ... [SEP] for BERT)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A raw completion prompt: with the BOS token first where the tokenizer asks for it (`add_bos_token`: Gemma,
        Llama 2/3), as llama.cpp and transformers do; chat templates write their own BOS."""
        ids = self.encode(text)
        bos = self.token_to_id(self.config.get("bos_token") or "") if self.config.get("add_bos_token") else None
        return [bos] + ids if bos is not None and ids[:1] != [bos] else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def token_text(self, i: int) -> str:
        """The text one token stands for (for logprobs), special tokens included."""
        return self._tok.decode([i], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class TextStreamer:
    """Incremental detokenization: each put() returns only new, complete text.

    Decoding a token alone loses context (leading spaces of SentencePiece pieces, multi-byte characters split across
    byte-level tokens), so the new tokens are decoded after a few previous ones and the previous text is subtracted;
    while the result ends in U+FFFD (an incomplete UTF-8 sequence) the tokens are held back (up to 4 tokens).
    """

    CONTEXT = 4
    MAX_HOLD = 4

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.prefix: list[int] = []
        self.pending: list[int] = []

    def put(self, ids: Sequence[int]) -> str:
        self.pending.extend(ids)
        prefix_text = self.tok.decode(self.prefix)
        full = self.tok.decode(self.prefix + self.pending)
        if full.endswith(REPLACEMENT) and len(self.pending) < self.MAX_HOLD:
            return ""
        return self._advance(prefix_text, full)

    def finish(self) -> str:
        if not self.pending:
            return ""
        return self._advance(self.tok.decode(self.prefix), self.tok.decode(self.prefix + self.pending))

    def _advance(self, prefix_text: str, full: str) -> str:
        if full.startswith(prefix_text):
            delta = full[len(prefix_text):]
        else:  # the decoder rewrote earlier text (rare): emit from the first difference on
            common = 0
            while common < min(len(full), len(prefix_text)) and full[common] == prefix_text[common]:
                common += 1
            delta = full[common:]
        self.prefix = (self.prefix + self.pending)[-self.CONTEXT:]
        self.pending = []
        return delta


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back: it may become
    `tag` once more text arrives)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class StopStrMatcher:
    """Holds back text that may begin a stop string; reports a stop and never emits the stop string itself."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.stopped = False

    def put(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
            return out
        hold = max((partial_suffix(self.buffer, s) for s in self.stop), default=0)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return out

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
