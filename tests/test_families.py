"""Every model family: a tiny random model written as a Hugging Face folder (the family's own tensor names), built by
the project's steps, its logits against the independent float64 numpy reference (tests/reference.py) over a ragged
batch_prefill and several batch_decode steps; the CPU kernels swapped in by the compiler, not by the model; bad
input."""
from __future__ import annotations

import json

import numpy as np
import pytest

import tvm

from mlc_llm import tensor_cache
from mlc_llm.compiler import cpu_gemv
from mlc_llm.model import FAMILIES, family_for_hf, hf_shapes
from mlc_llm.steps.compile import compile_model

from .helpers import build_with_steps, max_logit_diff
from .reference import NumpyLlama
from .tiny_hf import TINY_FAMILIES, write_safetensors, write_tiny_family

TOL = 1e-3
PROMPTS = [[5, 17, 200, 3, 99, 12, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58], [7, 8, 9],
           [250, 1, 2, 3, 4, 5, 6]]


def test_every_family_has_a_tiny_test_model():
    assert set(TINY_FAMILIES) == {f.hf_model_types[0] for f in FAMILIES.values()}


def _build(tmp_path, monkeypatch, family: str, quant: str):
    """The family's tiny model built by the project's steps: (model dir, library, the optimized module's PrimFuncs
    {name: PrimFunc} as compile_model built them — recorded on the way, so one build serves both checks)."""
    from mlc_llm.steps import compile as compile_step

    built = {}

    def recording(*args, **kwargs):
        built["mod"], target = real(*args, **kwargs)
        return built["mod"], target

    real = compile_step.optimized_module
    monkeypatch.setattr(compile_step, "optimized_module", recording)
    write_tiny_family(tmp_path / "hf", FAMILIES[family].hf_model_types[0])
    out = tmp_path / "model"
    lib = build_with_steps(str(tmp_path / "hf"), quant, out)
    funcs = {gv.name_hint: f for gv, f in built["mod"].functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    return out, lib, funcs


def _assert_cpu_kernels_chosen(funcs, family: str, vocab: int):
    """The model is written with stock ops; on CPU the compiler swaps in the project's RMSNorm, activation, attention
    and RoPE kernels (Gemma 3: also on its windowed layers), and every int4 matmul (Qwen2's q/k/v with its bias too)
    runs the blocked int4 kernel (a bias as its epilogue) but the lm_head of a vocabulary that is not a multiple of
    the kernel's 64 rows (the tiny models' 300), scheduled generically."""
    marks = {name: f.attrs.get(cpu_gemv.KERNEL_ATTR) for name, f in funcs.items()}
    names = list(funcs)
    assert any(n.startswith("rms_norm_cpu") for n in names)
    assert not [n for n in names if "rms_norm" in n and not n.startswith("rms_norm_cpu")]  # QK-norm's too
    assert any(n.startswith("silu_mul_cpu") for n in names) == (family != "gemma3")
    assert any(n.startswith("gelu_tanh_mul_cpu") for n in names) == (family == "gemma3")
    attention = {f.attrs["global_symbol"] for n, f in funcs.items() if marks[n] == "cpu_attention"}
    assert {"batch_decode_paged_kv_cpu", "batch_prefill_ragged_kv", "batch_prefill_paged_kv_cpu",
            "fused_rope"} <= attention
    windowed = {"batch_decode_paged_kv_cpu_sliding_window", "batch_prefill_paged_kv_cpu_sliding_window"}
    assert (windowed <= attention) == (family == "gemma3")
    matmuls = {n: m for n, m in marks.items() if "matmul" in n}
    generic = [n for n, m in matmuls.items() if m != "q4_blocked64"]
    assert len(matmuls) > len(generic), matmuls
    for n in generic:
        dims = {int(x.value) for b in funcs[n].params for x in getattr(b, "shape", ()) if hasattr(x, "value")}
        assert vocab in dims and vocab % 64, (n, dims)
    if family == "qwen2":  # the bias-carrying kernels were matched, not scheduled generically
        biased = [n for n in matmuls if any(len(b.shape) == 1 for b in funcs[n].params)]
        assert biased and not set(biased) & set(generic), (biased, generic)


# Gemma 3 with q4f32_cpu: test_windowed_layers_at_three_times_the_window (the same build, longer prompts)
@pytest.mark.parametrize("family,quant", [(f, q) for q in ("q4f32_cpu", "q0f32") for f in sorted(FAMILIES)
                                          if (f, q) != ("gemma3", "q4f32_cpu")])
def test_family_logits_match_numpy(tmp_path, monkeypatch, family, quant):
    """The tiny model's logits against the float64 reference; with q4f32_cpu, the CPU kernels the compiler chose in
    the same build. Gemma 3's tiny model has a 16-token window on two of its three layers: the 21-token prompt is
    prefilled in two chunks (the second against history on the windowed layers) and decoding runs past the window."""
    out, lib, funcs = _build(tmp_path, monkeypatch, family, quant)
    chat = json.loads((out / "mlc-chat-config.json").read_text())
    assert chat["model_type"] == family
    diff = max_logit_diff(out, lib, PROMPTS, decode_steps=4)
    assert diff < TOL, f"{family} {quant}: max |Δlogit| {diff:.2e}"
    if quant == "q4f32_cpu":
        _assert_cpu_kernels_chosen(funcs, family, chat["vocab_size"])


@pytest.mark.parametrize("family,option", [("qwen2", "qkv_bias"), ("qwen3", "q_norm")])
def test_family_options_matter_in_the_reference(tmp_path, family, option):
    """Guards the test above: dropping the family's q/k/v bias or QK-norm changes the reference's logits a lot."""
    from mlc_llm.steps.convert_weight import convert_weight
    from mlc_llm.steps.gen_config import gen_config

    write_tiny_family(tmp_path / "hf", family)
    gen_config(str(tmp_path / "hf"), "q0f32", "chatml", tmp_path / "m")
    convert_weight(str(tmp_path / "hf"), "q0f32", tmp_path / "m", progress=False)
    cfg = json.loads((tmp_path / "m" / "mlc-chat-config.json").read_text())["model_config"]
    params = tensor_cache.load_numpy(tmp_path / "m")
    full = NumpyLlama(params, cfg).logits(PROMPTS[0])
    key = {"qkv_bias": ".self_attn.qkv_proj.bias", "q_norm": ".self_attn.q_norm.weight"}[option]
    reduced = NumpyLlama({k: v for k, v in params.items() if not k.endswith(key)}, cfg).logits(PROMPTS[0])
    assert np.abs(full - reduced).max() > 50 * TOL


def test_windowed_layers_at_three_times_the_window(tmp_path, monkeypatch):
    """Gemma-shaped tiny model, 16-token window on layers 0 and 2 (their own RoPE base), q4: the compiler chose the
    CPU kernels (the windowed ones too); a 40-token prompt in chunks of the window (later chunks against history
    through the windowed paged-prefill kernel), then decoding to 48 tokens (the windowed decode kernel, the window
    starting inside a page), against the reference that masks each windowed layer to its last 16 tokens, also with
    the KV cache in float16; and that reference is far from full attention."""
    out, lib, funcs = _build(tmp_path, monkeypatch, "gemma3", "q4f32_cpu")
    cfg = json.loads((out / "mlc-chat-config.json").read_text())
    _assert_cpu_kernels_chosen(funcs, "gemma3", cfg["vocab_size"])
    assert cfg["prefill_chunk_size"] == 16 and cfg["model_config"]["layer_types"] == ["sliding", "full", "sliding"]
    prompts = [list(range(5, 45)), [7, 8, 9], list(range(100, 133))]
    diff = max_logit_diff(out, lib, prompts, decode_steps=8)
    assert diff < TOL, f"max |Δlogit| {diff:.2e}"
    # the same kernels over float16 pages (device.kv_cache_dtype=float16): 0.022 measured
    kv16 = compile_model(out, "cpu", out / "lib" / "cpu-kv16.so", kv_cache_dtype="float16")
    diff16 = max_logit_diff(out, kv16, prompts, decode_steps=8)
    assert TOL < diff16 < 0.1, f"float16 KV cache: max |Δlogit| {diff16:.2e}"
    params = tensor_cache.load_numpy(out)
    windowed = NumpyLlama(params, cfg["model_config"]).logits(prompts[0])
    full = NumpyLlama(params, {**cfg["model_config"], "sliding_window": -1}).logits(prompts[0])
    assert np.abs(windowed[:16] - full[:16]).max() < 1e-9 and np.abs(windowed - full).max() > 50 * TOL


def test_bias_epilogue_kernel_matches_numpy():
    """The blocked int4 kernel with a bias (y = x . w^T + b) for a decode batch and a prefill, vs numpy."""
    from mlc_llm.compiler import cpu_q4_blocked
    from mlc_llm.quantization.scheme import block_rows, quantize_q4

    n, k = 128, 64
    rng = np.random.default_rng(3)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    qw, qs = quantize_q4(w, "float32")
    from .reference import dequant_q4

    wd = dequant_q4(qw, qs, k)
    dev = tvm.cpu()
    for layout, shape in (("b1", (3, 1, k)), ("1s", (1, 37, k))):
        kern = cpu_q4_blocked.blocked_kernel(n, k, layout, cpu_gemv.BIAS)
        stock = cpu_q4_blocked.stock_kernel(n, k, layout, cpu_gemv.BIAS)
        assert cpu_q4_blocked.replace_blocked_q4_matmul(stock) is not None
        f = tvm.compile(tvm.IRModule({"main": kern.with_attr("global_symbol", "main")}), target="llvm")["main"]
        x = rng.standard_normal(shape).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros(shape[:2] + (n,), np.float32), dev)
        f(*(tvm.runtime.tensor(a, dev) for a in (block_rows(qw), block_rows(qs), x, bias)), y)
        np.testing.assert_allclose(y.numpy(), x.astype(np.float64) @ wd.T + bias, rtol=1e-5, atol=1e-4)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from mlc_llm.steps.gen_config import gen_config

    write_tiny_family(tmp_path / "hf", "llama")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon",
                                                             "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ValueError, match=r"model_type 'falcon' \(FalconForCausalLM\); supported model_types: .*qwen2"):
        gen_config(str(tmp_path / "hf"), "q0f32", "chatml", tmp_path / "m")
    assert not (tmp_path / "m" / "mlc-chat-config.json").exists()


def test_checkpoint_not_matching_the_family_says_which_tensor(tmp_path):
    """A qwen2 config over a checkpoint without q/k/v biases: the missing tensor is named and nothing is written."""
    from mlc_llm.steps.convert_weight import convert_weight

    write_tiny_family(tmp_path / "hf", "llama")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.q_proj.bias' \(and \d+ more\) of the "
                                         r"qwen2 architecture is missing"):
        convert_weight(str(tmp_path / "hf"), "q0f32", tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "tensor-cache.json").exists()


def test_checkpoint_with_a_wrong_shape_says_which_tensor(tmp_path):
    from mlc_llm.loader.random_loader import RandomSource
    from mlc_llm.steps.convert_weight import convert_weight

    cfg = {"model_type": "qwen2", **TINY_FAMILIES["qwen2"]}
    src = RandomSource("qwen2", config=dict(cfg))
    tensors = {name: src.get(name) for name in src._shapes}
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:64]
    (tmp_path / "hf").mkdir()
    write_safetensors(tmp_path / "hf" / "model.safetensors", tensors)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \[64, 64\], the qwen2 config "
                                         r"implies \[192, 64\]"):
        convert_weight(str(tmp_path / "hf"), "q0f32", tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "tensor-cache.json").exists()


def test_random_presets_of_every_family_have_consistent_shapes():
    from mlc_llm.model import random_presets

    presets = random_presets()
    assert {"llama3_8b", "qwen2_5_7b", "phi3_mini", "mistral_7b", "qwen3_0_6b"} <= set(presets)
    for name, (fam, cfg) in presets.items():
        hf = {"model_type": fam.hf_model_types[0], **cfg}
        assert family_for_hf(hf) is fam
        shapes = hf_shapes(fam, fam.config(hf))
        assert shapes["model.embed_tokens.weight"] == (cfg["vocab_size"], cfg["hidden_size"]), name


def test_sliding_window_configs():
    """Mistral v0.1's window on every layer caps the context; Gemma 3's pattern (every 6th layer full) from a config
    without layer_types; a context that fits in the window needs no windowed layers at all."""
    mistral = FAMILIES["mistral"].config({"model_type": "mistral", **TINY_FAMILIES["mistral"], "sliding_window": 128,
                                          "max_position_embeddings": 4096})
    assert not mistral.windowed and mistral.context_window_size == 128 and mistral.prefill_chunk_size == 128
    gemma = {"model_type": "gemma3_text", **TINY_FAMILIES["gemma3_text"], "num_hidden_layers": 12}
    del gemma["layer_types"]
    cfg = FAMILIES["gemma3"].config(gemma)
    assert cfg.layer_types == (["sliding"] * 5 + ["full"]) * 2 and cfg.layer_theta(0) == 10000.0
    assert cfg.layer_theta(5) == 1000000.0
    short = FAMILIES["gemma3"].config(gemma, context_window_size=16)
    assert not short.windowed and short.layer_theta(0) == 10000.0
