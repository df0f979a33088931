"""JIT: MLCEngine(model_dir) without a library compiles one into the cache, honouring MLC_JIT_POLICY."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from mlc_llm import MLCEngine
from mlc_llm.serve.jit import library_key

from .conftest import run_cli


def test_jit_policies(tmp_path, monkeypatch):
    """On a tiny random model (gen_config + convert_weight, no library): the policies do not depend on the model,
    and its library compiles in seconds."""
    from mlc_llm.steps.convert_weight import convert_weight
    from mlc_llm.steps.gen_config import gen_config

    from .tiny_hf import write_tiny_family

    write_tiny_family(tmp_path / "hf", "llama")
    gen_config(str(tmp_path / "hf"), "q0f32", "chatml", tmp_path / "model")
    convert_weight(str(tmp_path / "hf"), "q0f32", tmp_path / "model", progress=False)
    monkeypatch.setenv("MLC_LLM_HOME", str(tmp_path / "home"))
    model = str(tmp_path / "model")
    for policy in ("READONLY", "OFF"):
        monkeypatch.setenv("MLC_JIT_POLICY", policy)
        with pytest.raises(FileNotFoundError, match=f"MLC_JIT_POLICY={policy} forbids compiling"):
            MLCEngine(model)
    monkeypatch.setenv("MLC_JIT_POLICY", "ON")
    with MLCEngine(model) as engine:
        text = engine.completions.create(prompt="The sky is", temperature=0, max_tokens=3).choices[0].text
    libs = list((tmp_path / "home" / "model_lib").glob("*.so"))
    assert len(libs) == 1
    first = libs[0].stat().st_mtime_ns
    with MLCEngine(model) as engine:  # cached: no compile
        assert engine.completions.create(prompt="The sky is", temperature=0, max_tokens=3).choices[0].text == text
    assert libs[0].stat().st_mtime_ns == first
    monkeypatch.setenv("MLC_JIT_POLICY", "READONLY")
    MLCEngine(model).terminate()
    monkeypatch.setenv("MLC_JIT_POLICY", "REDO")
    MLCEngine(model).terminate()
    assert libs[0].stat().st_mtime_ns != first


def test_library_key_covers_what_the_library_depends_on(smollm_q4):
    chat = json.loads((smollm_q4.dir / "mlc-chat-config.json").read_text())
    key = library_key(chat, "cpu")
    assert library_key(chat, "cpu") == key
    assert library_key(chat, "cuda") != key
    assert library_key({**chat, "quantization": "q0f32"}, "cpu") != key
    assert library_key({**chat, "model_config": {**chat["model_config"], "context_window_size": 1024}}, "cpu") != key
    assert library_key({**chat, "conv_template": {"name": "x"}}, "cpu") == key  # templates do not reach the library


def test_tokenizer_chat_template_fallback(smollm_q4, tmp_path):
    """conv_template 'jinja': the prompt comes from the model's own chat template (here identical to chatml with
    SmolLM's system prompt, so the answers must agree)."""
    d = tmp_path / "model"
    d.mkdir()
    for f in smollm_q4.dir.iterdir():
        if f.is_file():
            os.symlink(f, d / f.name) if f.suffix == ".bin" else shutil.copy(f, d / f.name)
    chat = json.loads((d / "mlc-chat-config.json").read_text())
    conv = chat["conv_template"]
    chat["conv_template"] = {"name": "jinja"}
    (d / "mlc-chat-config.json").write_text(json.dumps(chat))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    with MLCEngine(str(d), model_lib=str(smollm_q4.lib)) as engine:
        assert engine.conv is None
        prompt = engine._render_jinja(msgs)
        reply = engine.chat.completions.create(messages=msgs, temperature=0, max_tokens=12)
    assert prompt.startswith("<|im_start|>system\n" + conv["system_message"])
    assert "Paris" in reply.choices[0].message.content
    # the `generate` command renders it too
    r = run_cli("generate", str(d), "--model-lib", str(smollm_q4.lib), "--prompt", msgs[0]["content"],
                "--max-tokens", "12")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout, r.stdout
