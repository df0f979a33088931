"""`mlc_llm chat MODEL`: a terminal chat on MLCEngine (streaming, history, slash commands).

In a terminal the line editor is prompt_toolkit (history, Esc+Enter for a new line); with piped stdin every line is
one message or command and the answers go to stdout, so `echo "Hi" | mlc_llm chat MODEL` works in scripts.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Optional

HELP = """You can use the following special commands:
  /help               print this message
  /exit               quit (Ctrl-D works too)
  /stats              prefill and decode speed of the last answer
  /metrics            engine counters since start
  /reset              forget the conversation so far
  /set k=v;k2=v2      generation settings, e.g. /set temperature=0.5;max_gen_len=100;stop=end,stop
                      keys: temperature, top_p, top_k, min_p, presence_penalty, frequency_penalty,
                      repetition_penalty, max_gen_len (alias max_tokens), seed, stop (comma-separated)
                      an empty value (e.g. "seed=") restores the default
Multi-line input: Esc then Enter inserts a new line; Enter sends."""

_FLOAT_KEYS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INT_KEYS = ("top_k", "max_tokens", "seed")
_ALIASES = {"max_gen_len": "max_tokens"}


def parse_set(text: str) -> dict[str, Any]:
    """'temperature=0.5;max_gen_len=100;stop=end,stop' -> settings; an empty value means 'back to default' (None).
    Raises ValueError naming the bad item."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, raw = item.partition("=")
        key = _ALIASES.get(key.strip(), key.strip())
        raw = raw.strip()
        if not sep:
            raise ValueError(f"'{item}' is not key=value")
        if key not in _FLOAT_KEYS + _INT_KEYS + ("stop",):
            allowed = ", ".join(_FLOAT_KEYS + _INT_KEYS + ("max_gen_len", "stop"))
            raise ValueError(f"unknown setting '{key}' (allowed: {allowed})")
        if raw == "":
            out[key] = None
        elif key in _FLOAT_KEYS:
            try:
                out[key] = float(raw)
            except ValueError:
                raise ValueError(f"{key}: '{raw}' is not a number") from None
        elif key in _INT_KEYS:
            try:
                out[key] = int(raw)
            except ValueError:
                raise ValueError(f"{key}: '{raw}' is not an integer") from None
        else:
            out[key] = [s for s in raw.split(",") if s]
    return out


class ChatSession:
    """The state of one chat: history, settings, and the last answer's usage. Kept apart from the terminal so the
    logic is testable and reusable."""

    def __init__(self, engine, write: Callable[[str], None]):
        self.engine = engine
        self.write = write
        self.history: list[dict[str, str]] = []
        self.settings: dict[str, Any] = {}
        self.last_usage: Optional[dict[str, Any]] = None

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, arg = line[1:].partition(" ")
        name = name.strip().lower()
        if name in ("exit", "quit", "bye"):
            return False
        if name == "help":
            self.write(HELP + "\n")
        elif name == "reset":
            self.history.clear()
            self.write("RESET CHAT SUCCESS\n")
        elif name == "stats":
            self.write(self.stats_text() + "\n")
        elif name == "metrics":
            m = self.engine.metrics()
            keys = ("prefill_tokens", "prefill_tokens_per_s", "decode_tokens", "decode_tokens_per_s",
                    "requests_finished", "requests_aborted", "preemptions", "kv_pages_free", "kv_pages_total")
            self.write("\n".join(f"{k}: {m[k]:.1f}" if isinstance(m[k], float) else f"{k}: {m[k]}"
                                 for k in keys) + "\n")
        elif name == "set":
            try:
                values = parse_set(arg)
            except ValueError as e:
                self.write(f"error: {e}\n")
                return True
            for k, v in values.items():
                if v is None:
                    self.settings.pop(k, None)
                else:
                    self.settings[k] = v
            self.write(f"settings: {self.settings}\n")
        else:
            self.write(f"unknown command '/{name}' (type /help)\n")
        return True

    def stats_text(self) -> str:
        if not self.last_usage:
            return "no answer yet"
        u = self.last_usage
        extra = u.get("extra") or {}

        def rate(v):
            return f"{v:.1f} tok/s" if v else "n/a"

        return (f"prefill: {rate(extra.get('prefill_tokens_per_s'))}, decode: {rate(extra.get('decode_tokens_per_s'))}"
                f" ({u['prompt_tokens']} prompt tokens, {u['completion_tokens']} generated)")

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to one user message; history is updated only when the answer completes."""
        from .serve.protocol import BadRequestError

        messages = self.history + [{"role": "user", "content": text}]
        try:
            stream = self.engine.chat.completions.create(messages=messages, stream=True,
                                                         stream_options={"include_usage": True}, **self.settings)
        except BadRequestError as e:
            hint = " (use /reset to start a new conversation)" if "context" in str(e) or "KV cache" in str(e) else ""
            self.write(f"error: {e}{hint}\n")
            return
        answer = []
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    self.last_usage = chunk.usage.model_dump()
                for c in chunk.choices:
                    if c.delta.content:
                        answer.append(c.delta.content)
                        yield c.delta.content
        finally:
            stream.close()  # an interrupted answer is aborted in the engine at once
        self.history = messages + [{"role": "assistant", "content": "".join(answer)}]


def _terminal_reader() -> Callable[[], Optional[str]]:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    session: PromptSession = PromptSession(key_bindings=kb)

    def read() -> Optional[str]:
        while True:
            try:
                return session.prompt(">>> ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line, as in a shell
            except EOFError:
                return None

    return read


def _pipe_reader() -> Callable[[], Optional[str]]:
    def read() -> Optional[str]:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    return read


def run_chat(model: str, model_lib: Optional[str], device: str, overrides: Optional[str]) -> int:
    from .serve.engine import MLCEngine

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    print(f"Loading {model} ...", file=sys.stderr, flush=True)
    with MLCEngine(model, model_lib=model_lib, device=device, mode="interactive", overrides=overrides) as engine:

        def write(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()

        session = ChatSession(engine, write)
        if interactive:
            write("Type /help for commands; /exit or Ctrl-D to quit.\n")
        read = _terminal_reader() if interactive else _pipe_reader()
        while True:
            line = read()
            if line is None:
                break
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                if not session.command(line.strip()):
                    break
                continue
            try:
                for piece in session.ask(line):
                    write(piece)
                write("\n")
            except KeyboardInterrupt:
                write("\n[interrupted]\n")
    return 0
