"""Conversation templates (MLC's `Conversation` JSON): named presets and prompt assembly.

Prompt = system part, then per message `role + role_content_sep + content + sep`, then the final
`assistant role + role_empty_sep` that the model continues (MLC_REFERENCE.md §5).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conversation:
    name: str
    system_template: str = "{system_message}"
    system_message: str = ""
    system_prefix_token_ids: list[int] | None = None
    add_role_after_system_message: bool = True
    roles: dict[str, str] = field(default_factory=dict)
    role_templates: dict[str, str] = field(default_factory=lambda: {
        "user": "{user_message}", "assistant": "{assistant_message}", "tool": "{tool_message}"})
    messages: list[list[Any]] = field(default_factory=list)
    seps: list[str] = field(default_factory=lambda: ["\n"])
    role_content_sep: str = ""
    role_empty_sep: str = ""
    stop_str: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    function_string: str = ""
    use_function_calling: bool = False
    # How tools are offered and calls written (mlc_llm/serve/tools.py): hermes | llama3_json | pythonic;
    # empty = the template family's own format (see DEFAULT_TOOL_FORMATS).
    tool_format: str = ""

    @property
    def effective_tool_format(self) -> str:
        return self.tool_format or DEFAULT_TOOL_FORMATS.get(self.name, "pythonic")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Conversation":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def as_prompt(self, messages: list[dict[str, str]]) -> str:
        """OpenAI-style messages -> prompt text ending with the assistant's turn opener."""
        system = self.system_message
        turns = []
        for i, m in enumerate(messages):
            role, content = m["role"], m.get("content") or ""
            if role == "system":
                if i != 0:
                    raise ValueError("a system message is only allowed as the first message")
                system = content
                continue
            if role not in self.roles:
                raise ValueError(f"role '{role}' is not supported by template '{self.name}' "
                                 f"(allowed: system, {', '.join(self.roles)})")
            turns.append((role, content))
        out = [self.system_template.format(system_message=system)] if system or "{system_message}" not in \
            self.system_template else []
        for j, (role, content) in enumerate(turns):
            sep = self.seps[-1] if role == "assistant" else self.seps[0]
            body = self.role_templates.get(role, "{%s_message}" % role).format(**{f"{role}_message": content})
            if j == 0 and out and not self.add_role_after_system_message:
                out.append(body + sep)  # [INST]-style: the first user text follows the system block directly
            else:
                out.append(self.roles[role] + self.role_content_sep + body + sep)
        out.append(self.roles["assistant"] + self.role_empty_sep)
        return "".join(out)


def _chatml(name: str, system: str, stop_ids: list[int], stop_str: list[str] | None = None) -> Conversation:
    return Conversation(
        name=name, system_template="<|im_start|>system\n{system_message}<|im_end|>\n", system_message=system,
        roles={"user": "<|im_start|>user", "assistant": "<|im_start|>assistant", "tool": "<|im_start|>user"},
        seps=["<|im_end|>\n"], role_content_sep="\n", role_empty_sep="\n",
        stop_str=stop_str or ["<|im_end|>"], stop_token_ids=stop_ids)


def _templates() -> dict[str, Conversation]:
    llama2_system = "You are a helpful, respectful and honest assistant."
    return {t.name: t for t in [
        _chatml("chatml", "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful "
                          "and honest answers.", [2]),
        _chatml("chatml_nosystem", "", [2]),
        _chatml("qwen2", "You are a helpful assistant.", [151643, 151645], ["<|endoftext|>", "<|im_end|>"]),
        Conversation(
            name="llama-3",
            system_template="<|start_header_id|>system<|end_header_id|>\n\n{system_message}<|eot_id|>",
            system_message="You are a helpful, respectful and honest assistant.",
            system_prefix_token_ids=[128000],
            roles={"user": "<|start_header_id|>user", "assistant": "<|start_header_id|>assistant",
                   "tool": "<|start_header_id|>ipython"},
            seps=["<|eot_id|>"], role_content_sep="<|end_header_id|>\n\n", role_empty_sep="<|end_header_id|>\n\n",
            stop_str=["<|end_of_text|>", "<|eot_id|>"], stop_token_ids=[128001, 128009]),
        Conversation(
            name="llama-2", system_template="[INST] <<SYS>>\n{system_message}\n<</SYS>>\n\n",
            system_message=llama2_system, system_prefix_token_ids=[1], add_role_after_system_message=False,
            roles={"user": "[INST]", "assistant": "[/INST]", "tool": "[INST]"}, seps=[" ", " </s><s>"],
            role_content_sep=" ", role_empty_sep=" ", stop_str=["[INST]"], stop_token_ids=[2]),
        Conversation(
            name="phi-3", system_template="<|system|>\n{system_message}<|end|>\n",
            system_message="You are a helpful digital assistant. Please provide safe, ethical and accurate "
                           "information to the user.",
            roles={"user": "<|user|>", "assistant": "<|assistant|>", "tool": "<|user|>"}, seps=["<|end|>\n"],
            role_content_sep="\n", role_empty_sep="\n", stop_str=["<|endoftext|>", "<|end|>"],
            stop_token_ids=[32000, 32001, 32007]),
        Conversation(
            name="gemma_instruction", system_template="{system_message}", system_message="",
            system_prefix_token_ids=[2],
            roles={"user": "<start_of_turn>user", "assistant": "<start_of_turn>model", "tool": "<start_of_turn>user"},
            seps=["<end_of_turn>\n"], role_content_sep="\n", role_empty_sep="\n", stop_str=["<end_of_turn>"],
            stop_token_ids=[1, 107]),
        Conversation(
            name="mistral_default", system_template="[INST] {system_message}\n\n",
            system_message="Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
                           "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote "
                           "fairness and positivity.",
            system_prefix_token_ids=[1], add_role_after_system_message=False,
            roles={"user": "[INST]", "assistant": "[/INST]", "tool": "[INST]"}, seps=[" ", "</s>"],
            role_content_sep=" ", role_empty_sep="", stop_str=["</s>"], stop_token_ids=[2]),
    ]}


CONV_TEMPLATES = _templates()
ALIASES = {"gemma": "gemma_instruction", "mistral": "mistral_default", "llama3": "llama-3", "llama2": "llama-2",
           "phi3": "phi-3"}


DEFAULT_TOOL_FORMATS = {"chatml": "hermes", "chatml_nosystem": "hermes", "qwen2": "hermes", "llama-3": "llama3_json",
                        "jinja": "hermes"}


JINJA = "jinja"  # no named template: the engine renders the tokenizer's own chat template


def get_conv_template(name: str) -> Conversation:
    if name == JINJA:
        return Conversation(name=JINJA, system_template="", roles={})
    key = ALIASES.get(name, name)
    if key not in CONV_TEMPLATES:
        allowed = sorted(set(CONV_TEMPLATES) | set(ALIASES) | {JINJA})
        raise ValueError(f"unknown conv_template '{name}' (allowed: {', '.join(allowed)})")
    return Conversation.from_dict(CONV_TEMPLATES[key].to_dict())  # a copy the caller may edit
