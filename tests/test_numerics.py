"""Compiled logits against an independent float64 numpy Llama on the same (dequantized) weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from mlc_llm import tensor_cache

from .helpers import build_with_steps, max_logit_diff
from .reference import NumpyLlama
from .tiny_hf import write_tiny_hf

TOL = 1e-3


def smollm_prompts(model_dir) -> list[list[int]]:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    texts = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a land far away, "
             "there lived a", "1 2 3 4"]
    return [tok.encode(t).ids for t in texts]


@pytest.mark.parametrize("fixture", ["smollm_q0", "smollm_q4"])
def test_smollm2_logits_match_numpy(fixture, request):
    art = request.getfixturevalue(fixture)
    diff = max_logit_diff(art.dir, art.lib, smollm_prompts(art.dir), decode_steps=4)
    assert diff < TOL, f"max |Δlogit| {diff:.2e}"


@pytest.mark.parametrize("quant", ["q0f32", "q4f32_1", "q4f32_cpu"])
def test_tiny_llama31_from_hf_folder_matches_numpy(tmp_path, quant):
    """Untied lm_head, GQA, Llama-3.1 RoPE scaling, bf16 + f32 safetensors across two shards."""
    write_tiny_hf(tmp_path / "hf")
    out = tmp_path / f"tiny-{quant}"
    lib = build_with_steps(str(tmp_path / "hf"), quant, out)
    prompts = [[5, 17, 200, 3, 99, 12, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58], [7, 8, 9],
               [250, 1, 2, 3, 4, 5, 6]]
    diff = max_logit_diff(out, lib, prompts, decode_steps=5)
    assert diff < TOL, f"max |Δlogit| {diff:.2e}"


def test_rope_scaling_matters_in_the_reference(tmp_path):
    """Guards the test above: with these positions, ignoring Llama-3.1 scaling would change logits a lot."""
    write_tiny_hf(tmp_path / "hf")
    out = tmp_path / "tiny"
    from mlc_llm.steps.convert_weight import convert_weight
    from mlc_llm.steps.gen_config import gen_config

    gen_config(str(tmp_path / "hf"), "q0f32", "chatml", out)
    convert_weight(str(tmp_path / "hf"), "q0f32", out, progress=False)
    cfg = json.loads((out / "mlc-chat-config.json").read_text())["model_config"]
    assert cfg["rope_scaling"]["rope_type"] == "llama3"
    params = tensor_cache.load_numpy(out)
    tokens = list(range(3, 27))
    scaled = NumpyLlama(params, cfg).logits(tokens)
    plain = NumpyLlama(params, {**cfg, "rope_scaling": {}}).logits(tokens)
    assert np.abs(scaled - plain).max() > 50 * TOL
