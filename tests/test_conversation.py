"""Named conversation templates render the formats their models were trained on."""
from __future__ import annotations

import pytest

from mlc_llm.conversation import get_conv_template

MSGS = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("name, expected", [
    ("llama-3", "<|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("qwen2", "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
              "<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    ("llama-2", "[INST] <<SYS>>\nSYS\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST] "),
    ("phi-3", "<|system|>\nSYS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nBye<|end|>\n"
              "<|assistant|>\n"),
    ("gemma", "SYS<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    ("mistral", "[INST] SYS\n\nHi [/INST] Hello!</s>[INST] Bye [/INST]"),
])
def test_template_formats(name, expected):
    assert get_conv_template(name).as_prompt(MSGS) == expected


def test_templates_carry_stops_and_prefixes():
    llama3 = get_conv_template("llama-3")
    assert llama3.stop_token_ids == [128001, 128009] and llama3.system_prefix_token_ids == [128000]
    assert "<|eot_id|>" in llama3.stop_str
    assert get_conv_template("gemma").stop_token_ids == [1, 107]
    assert get_conv_template("qwen2").stop_token_ids == [151643, 151645]


def test_default_system_message_and_unknown_roles():
    conv = get_conv_template("chatml")
    assert conv.as_prompt([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant.")
    with pytest.raises(ValueError, match="role 'narrator' is not supported"):
        conv.as_prompt([{"role": "narrator", "content": "x"}])
    with pytest.raises(ValueError, match="unknown conv_template 'vicuna'"):
        get_conv_template("vicuna")
