"""Function calling: tool definitions in the prompt, tool calls and results in the history, grammars that force valid
calls, and parsing of the model's output into OpenAI `tool_calls` (incrementally, for streams).

Three formats, chosen by the conversation template (`Conversation.tool_format`):
- `hermes` (Hermes / Qwen / ChatML models): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block
  per call; tool results are sent back as `<tool_response>...</tool_response>` in the template's tool role.
- `llama3_json` (Llama 3.1): `{"name": ..., "parameters": {...}}`, several calls separated by `; `; results in the
  `ipython` role.
- `pythonic` (the original MLC LLM's / Gorilla style): `[get_weather(location="Paris"), ...]`.
"""
from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from ..tokenizer import partial_suffix
from .grammar import check_json_schema, close_objects, json_schema_rule
from .protocol import BadRequestError, parse_json

FORMATS = ("hermes", "llama3_json", "pythonic")
TAGS = {"hermes": ("<tool_call>", "</tool_call>")}  # fixed text around a call, a single token in some vocabularies
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tools(tools: list[Any]) -> list[Tool]:
    out: dict[str, Tool] = {}
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise BadRequestError(f"{where}: expected {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        fn = t["function"]
        unknown = set(fn) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise BadRequestError(f"{where}.function: unknown field(s) {', '.join(sorted(unknown))}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise BadRequestError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in out:
            raise BadRequestError(f"{where}: duplicate function name '{name}'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise BadRequestError(f"{where}.function.parameters must be a JSON schema object, got "
                                  f"{json.dumps(params)[:40]}")
        check_json_schema(params, f"{where}.function.parameters")
        if params.get("type", "object") != "object":
            raise BadRequestError(f"{where}.function.parameters must describe an object (\"type\": \"object\")")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise BadRequestError(f"{where}.function.description must be a string")
        out[name] = Tool(name, desc, params)
    if not out:
        raise BadRequestError("tools must not be empty")
    return list(out.values())


def parse_tool_choice(choice: Any, tools: list[Tool]) -> tuple[str, Optional[str]]:
    """-> (mode, forced name): mode is none / auto / required; a named function is required with its name."""
    if choice is None:
        return "auto", None
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise BadRequestError(f"tool_choice must be 'none', 'auto', 'required' or a function, got '{choice}'")
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequestError("tool_choice must be 'none', 'auto', 'required' or "
                              "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if fn["name"] not in {t.name for t in tools}:
        raise BadRequestError(f"tool_choice names function '{fn['name']}', which is not in tools "
                              f"({', '.join(t.name for t in tools)})")
    return "required", fn["name"]


def parse_history_calls(calls: Any, where: str) -> list[tuple[str, str, str]]:
    """An assistant message's tool_calls -> [(id, name, arguments JSON text)], checked."""
    out = []
    for j, c in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or c.get("type", "function") != "function":
            raise BadRequestError(f"{w}: expected {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                  "\"arguments\"}}}}")
        if not isinstance(c.get("id"), str) or not c["id"]:
            raise BadRequestError(f"{w}.id is required (a string)")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequestError(f"{w}.function.name is required (a string)")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            raise BadRequestError(f"{w}.function.arguments must be a JSON string")
        if not isinstance(parse_json(args, f"{w}.function.arguments"), dict):
            raise BadRequestError(f"{w}.function.arguments is not a JSON object: {args[:80]!r}")
        out.append((c["id"], fn["name"], args))
    return out


# ---- prompt side --------------------------------------------------------------------------------------------------
def _defs(tools: list[Tool]) -> str:
    return "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in tools)


def system_prompt(fmt: str, tools: list[Tool]) -> str:
    """The tool instructions appended to the system message."""
    if fmt == "hermes":
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                f"{_defs(tools)}\n</tools>\n\nFor each function call, return a json object with function name and "
                "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    if fmt == "llama3_json":
        return ("Given the following functions, please respond with a JSON for a function call with its proper "
                "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                "\"parameters\": dictionary of argument name and its value}. Do not use variables. Separate several "
                f"calls with '; '.\n\n{_defs(tools)}")
    return ("You have access to the following functions:\n" + _defs(tools) + "\n\nIf you decide to call functions, "
            "answer only with a list of calls in the format [func_name1(param1=value1, param2=value2), "
            "func_name2(param=value)] and no other text. Values are JSON literals.")


def render_calls(fmt: str, calls: list[tuple[str, str, str]]) -> str:
    """Assistant tool calls of the history, as the model would have written them."""
    if fmt == "hermes":
        return "\n".join(f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>'
                         for _, n, a in calls)
    if fmt == "llama3_json":
        return "; ".join(f'{{"name": {json.dumps(n)}, "parameters": {a}}}' for _, n, a in calls)
    parts = []
    for _, n, a in calls:
        kwargs = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in json.loads(a).items())
        parts.append(f"{n}({kwargs})")
    return "[" + ", ".join(parts) + "]"


def render_result(fmt: str, content: str) -> str:
    """A tool message's content as the template's tool role shows it (hermes wraps it in <tool_response>)."""
    if fmt == "hermes":
        return f"<tool_response>\n{content}\n</tool_response>"
    return content


# ---- grammar side -------------------------------------------------------------------------------------------------
def _lit(s: str) -> str:
    return json.dumps(s)


def _call_rule(fmt: str, tool: Tool) -> str:
    if fmt in ("hermes", "llama3_json"):
        key = "arguments" if fmt == "hermes" else "parameters"
        head = '{"name": ' + json.dumps(tool.name) + f', "{key}": '
        return f'{_lit(head)} {json_schema_rule(close_objects(tool.parameters))} "}}"'
    # pythonic: name(k=v, ...) in the schema's property order; optional arguments may be left out
    props = tool.parameters.get("properties", {}) or {}
    for k in props:
        if not k.isidentifier():
            raise BadRequestError(f"tools: parameter '{k}' of '{tool.name}' is not a Python identifier, which the "
                                  "pythonic tool-call format of this model's template cannot write")
    required = set(tool.parameters.get("required", []) or [])
    items = [(f'{_lit(k + "=")} {json_schema_rule(close_objects(v))}', k in required) for k, v in props.items()]
    alts = []
    for i, (rule, _) in enumerate(items):  # i = the first argument written; all before it are optional
        tail = " ".join(f'", " {r}' if req else f'(", " {r})?' for r, req in items[i + 1:])
        alts.append(f"{rule} {tail}".strip())
        if items[i][1]:
            break
    if all(not req for _, req in items):
        alts.append('""')
    args = " | ".join(f"({a})" for a in alts) if alts else '""'
    return f'{_lit(tool.name + "(")} ({args}) ")"'


def tool_grammar(fmt: str, tools: list[Tool], mode: str, forced: Optional[str], parallel: bool,
                 single_tokens: frozenset[str] = frozenset()) -> str:
    """Lark grammar for llguidance: `required` forces one (or, with parallel calls, several) valid calls and nothing
    else; `auto` lets the model write text, but a call it starts must be valid. `single_tokens`: format tags that are
    one token of the vocabulary (Qwen's `<tool_call>`), which the grammar must name as tokens, not as text."""
    choices = [t for t in tools if forced is None or t.name == forced]
    lines = [f"call_{i}: {_call_rule(fmt, t)}" for i, t in enumerate(choices)]
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(choices))))
    if fmt == "hermes":
        open_, close = (tag if tag in single_tokens else _lit(tag) for tag in ("<tool_call>", "</tool_call>"))
        block = f'{open_} "\\n" call "\\n" {close}'
        if mode == "required":
            lines.insert(0, f'start: {block}' + (f' ("\\n" {block})*' if parallel else ""))
        elif "<tool_call>" in single_tokens:  # text cannot contain the tag token: no lazy trigger needed
            lines.insert(0, "start: TEXT? " + ("(tag TEXT?)*" if parallel else "(tag TEXT?)?"))
            lines += [f'tag: {open_} "\\n" call "\\n" {close}', r"TEXT: /(.|\n)+/"]
        else:
            lines.insert(0, "%llguidance {}")
            lines.insert(1, "start: " + ("tag* TEXT" if parallel else "tag? TEXT"))
            lines += [f'tag_trig[lazy]: TEXT {open_}', f'tag: tag_trig "\\n" call "\\n" {close}',
                      r"TEXT: /(.|\n)*/"]
        return "\n".join(lines)
    if fmt == "llama3_json":
        calls = 'call ("; " call)*' if parallel else "call"
    else:
        calls = '"[" call (", " call)* "]"' if parallel else '"[" call "]"'
    if mode == "required":
        lines.insert(0, f"start: {calls}")
    else:  # text that does not start like a call, or calls
        first = "{" if fmt == "llama3_json" else "["
        lines.insert(0, f"start: {calls} | TEXT")
        lines.append(f"TEXT: /([^{re.escape(first)}](.|\\n)*)?/")
    return "\n".join(lines)


# ---- output side --------------------------------------------------------------------------------------------------
@dataclass
class ParsedCall:
    name: Optional[str]
    arguments: str


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def _json_call(body: str, complete: bool) -> Optional[ParsedCall]:
    """`{"name": ..., "arguments"|"parameters": {...}}`, possibly cut off -> the call so far (None: name not known).

    While incomplete, the trailing run of '}' and whitespace is held back (it may close the outer object), so the
    arguments text only ever grows."""
    m = _HEAD.match(body)
    if m:
        name = json.loads(f'"{m.group(1)}"')
        rest = body[m.end():]
        if not complete:
            return ParsedCall(name, rest.rstrip("} \t\r\n"))
        args = rest.rstrip()
        if args.endswith("}"):
            args = args[:-1].rstrip()
        try:
            if isinstance(json.loads(args), dict):
                return ParsedCall(name, args)
        except ValueError:
            pass
    if complete:  # other key order or spacing: parse the whole object
        try:
            obj = json.loads(body)
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(obj.get("name"), str) and isinstance(args, dict):
                return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))
        except (ValueError, AttributeError):
            pass
    return None


def _split_json_objects(text: str) -> tuple[list[str], str]:
    """'{..}; {..}; {..' -> (complete objects, the unfinished rest), string-aware brace matching."""
    objs, depth, start, in_str, esc = [], 0, None, False, False
    for i, ch in enumerate(text):
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            if ch != "\\":
                esc = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                objs.append(text[start:i + 1])
                start = None
    return objs, (text[start:] if start is not None else "")


def _pythonic_calls(text: str) -> Optional[list[ParsedCall]]:
    names = {"true": True, "false": False, "null": None}

    def value(node):
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        return ast.literal_eval(node)

    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List):
            return None
        out = []
        for c in tree.elts:
            if not isinstance(c, ast.Call) or not isinstance(c.func, ast.Name) or c.args:
                return None
            out.append(ParsedCall(c.func.id, json.dumps({k.arg: value(k.value) for k in c.keywords},
                                                        ensure_ascii=False)))
        return out
    except (SyntaxError, ValueError, TypeError):
        return None


def parse_output(fmt: str, text: str, final: bool) -> tuple[str, list[ParsedCall]]:
    """The model's output so far -> (content, calls). Both only grow as text grows (safe to stream as deltas)."""
    if fmt == "hermes":
        start, end = "<tool_call>", "</tool_call>"
        content, calls, pos = [], [], 0
        while True:
            i = text.find(start, pos)
            before = text[pos:] if i < 0 else text[pos:i]
            if calls:  # text after a call: whitespace next to the call is the format's, not content
                before = before.lstrip()
            if i < 0:
                if not final:  # may still become a call: hold back a partial tag and trailing whitespace
                    before = before[:len(before) - partial_suffix(before, start)].rstrip()
                content.append(before)
                break
            content.append(before.rstrip())
            j = text.find(end, i + len(start))
            closed = j >= 0 or final
            body = text[i + len(start): j if j >= 0 else len(text)]
            if not closed:
                body = body[:len(body) - partial_suffix(body, end)]
            call = _json_call(body.strip() if closed else body, closed)
            if call is not None:
                calls.append(call)
            elif closed:  # not a call after all: keep the text
                content.append(text[i: j + len(end) if j >= 0 else len(text)])
            if j < 0:
                break
            pos = j + len(end)
        return "".join(content), calls
    stripped = text.lstrip().removeprefix("<|python_tag|>").lstrip()
    opener = "{" if fmt == "llama3_json" else "["
    if not stripped:
        return ("" if not final else text), []
    if not stripped.startswith(opener):
        return text, []
    if fmt == "llama3_json":
        objs, rest = _split_json_objects(stripped)
        calls = [c for c in (_json_call(o, True) for o in objs) if c is not None]
        if rest and not final:
            partial = _json_call(rest, False)
            if partial is not None:
                calls.append(partial)
        if final and (len(calls) != len(objs) or rest.strip()):
            return (text, []) if not calls else ("", calls)
        return "", calls
    calls = _pythonic_calls(stripped)
    if calls is None:
        return (text, []) if final else ("", [])
    return "", calls


@dataclass
class ToolCallDelta:
    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


@dataclass
class ToolStream:
    """Turns one choice's text deltas into content deltas and tool-call deltas (OpenAI's streaming shape: the first
    delta of a call carries id, type and name; later ones append to function.arguments)."""
    fmt: str
    text: str = ""
    content_sent: int = 0
    args_sent: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        self.text += delta
        content, calls = parse_output(self.fmt, self.text, final)
        out_content = content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(content))
        out_calls = []
        for i, c in enumerate(calls):
            if c.name is None:
                continue
            if i >= len(self.ids):
                self.ids.append(f"call_{uuid.uuid4().hex[:24]}")
                self.args_sent.append(0)
                out_calls.append(ToolCallDelta(i, self.ids[i], c.name, c.arguments))
            elif len(c.arguments) > self.args_sent[i]:
                out_calls.append(ToolCallDelta(i, arguments=c.arguments[self.args_sent[i]:]))
            self.args_sent[i] = max(self.args_sent[i], len(c.arguments))
        return out_content, out_calls

    @property
    def called(self) -> bool:
        return bool(self.ids)
