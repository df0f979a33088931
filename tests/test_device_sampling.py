"""Sampling inside the model library (compiler/sampling.py): checked against numpy and the host sampler on the CPU
build, compiled for CUDA with every kernel on the GPU, and through the engine (`sampler=device`) on real SmolLM2."""
from __future__ import annotations

import math
import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax

from mlc_llm.compiler import pipeline
from mlc_llm.compiler.passes import unbound_gpu_kernels
from mlc_llm.compiler.sampling import add_sampling_functions
from mlc_llm.compiler.target import make_target
from mlc_llm.serve.sampler import SampleRow, SamplingParams, _sample_row, device_inputs, on_device

V = 300


@pytest.fixture(scope="module")
def vm():
    target = make_target("cpu")
    ex = pipeline.build(pipeline.optimize(add_sampling_functions(tvm.IRModule(), V), target), target)
    return relax.VirtualMachine(ex, tvm.cpu())


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _logits(rng, b):
    return (rng.standard_normal((b, V)) * rng.uniform(0.5, 4, (b, 1))).astype(np.float32)


def test_greedy_tokens_and_logprobs_match_numpy(vm):
    x = _logits(np.random.default_rng(0), 16)
    tokens, lp = vm["sample_greedy"](_t(x))
    assert tokens.numpy().dtype == np.int32
    np.testing.assert_array_equal(tokens.numpy(), np.argmax(x, 1))
    np.testing.assert_allclose(lp.numpy(), _log_softmax(x)[np.arange(16), np.argmax(x, 1)], atol=1e-5)


class _Fixed:
    """A generator stand-in that returns the uniform the device got, so the host rule draws the same number."""

    def __init__(self, u: float):
        self.u = u

    def random(self):
        return self.u


def test_top_p_draws_the_host_samplers_token_for_the_same_uniform(vm):
    rng = np.random.default_rng(1)
    b = 512
    x = _logits(rng, b)
    temperature = rng.choice([0.0, 0.3, 0.7, 1.0, 1.5], b).astype(np.float32)
    top_p = rng.choice([0.1, 0.5, 0.9, 0.95, 1.0], b).astype(np.float32)
    uniform = rng.random(b).astype(np.float32)
    tokens, lp = vm["sample_top_p"](_t(x), _t(temperature), _t(top_p), _t(uniform))
    tokens = tokens.numpy()
    want = [int(np.argmax(x[i])) if temperature[i] == 0 else
            _sample_row(x[i], SamplingParams(temperature=float(temperature[i]), top_p=float(top_p[i])),
                        _Fixed(float(uniform[i]))) for i in range(b)]
    agree = np.mean(tokens == np.array(want))
    assert agree >= 0.995, agree  # float32 vs float64 cumulative sums may split a rare draw at a boundary
    np.testing.assert_allclose(lp.numpy(), _log_softmax(x)[np.arange(b), tokens], atol=1e-5)


def _chi2_critical(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9), (1.3, 0.6)])
def test_top_p_samples_follow_the_truncated_distribution(vm, temperature, top_p):
    rng = np.random.default_rng(2)
    row = (rng.standard_normal(V) * 2).astype(np.float32)
    n = 40_000
    x = np.broadcast_to(row, (n, V))
    tokens, _ = vm["sample_top_p"](_t(x), _t(np.full(n, temperature, np.float32)), _t(np.full(n, top_p, np.float32)),
                                   _t(rng.random(n).astype(np.float32)))
    counts = np.bincount(tokens.numpy(), minlength=V)
    # the distribution the draws must follow, in float64
    p = np.exp(_log_softmax(row[None] / temperature)[0])
    order = np.argsort(-p, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
    expected = np.zeros(V)
    expected[keep] = p[keep] / p[keep].sum()
    assert counts[expected == 0].sum() == 0  # nothing outside the top-p set
    big = expected * n >= 5  # chi-square over cells with enough expected draws, the rest pooled
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big] * n, expected[~big].sum() * n)
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    assert chi2 < _chi2_critical(len(obs) - 1), (chi2, len(obs))


def test_which_rows_the_device_sampler_takes():
    assert on_device(SamplingParams(temperature=0.7, top_p=0.9, logprobs=True), constrained=False)
    assert on_device(SamplingParams(top_k=1), constrained=False)
    for p in (SamplingParams(top_k=40), SamplingParams(min_p=0.1), SamplingParams(repetition_penalty=1.1),
              SamplingParams(logit_bias={1: 2.0}), SamplingParams(logprobs=True, top_logprobs=2)):
        assert not on_device(p, constrained=False), p
    assert not on_device(SamplingParams(), constrained=True)
    rng = np.random.default_rng(5)
    rows = [SampleRow(SamplingParams(temperature=0.0), rng, {}), SampleRow(SamplingParams(top_p=0.5), rng, {})]
    t, p, u = device_inputs(rows)
    assert t.tolist() == [0.0, 1.0] and p.tolist() == [1.0, 0.5] and u[0] == 0.0
    assert u[1] == np.float32(np.random.default_rng(5).random())  # one draw, only for the sampled row


def _cuda_sampling_library(tmp_path):
    target = make_target("cuda")
    mod = pipeline.optimize(add_sampling_functions(tvm.IRModule(), 49152), target)
    pipeline.build(mod, target).export_library(tmp_path / "sampling.so")
    return mod, tmp_path / "sampling.so"


def test_sampling_kernels_compile_for_cuda_on_the_gpu(tmp_path):
    mod, lib = _cuda_sampling_library(tmp_path)
    names = {gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert unbound_gpu_kernels(mod) == []
    # sort, scan and the draw went to TVM's GPU kernels (DispatchSortScan / DispatchSampling), not generic loops
    assert {"argsort", "gpu_2d_continuous_cumsum", "parallel_sampling_from_prob"} <= names, names
    source = lib.read_bytes().decode("latin-1")  # CUDA source, compiled when the library loads on a GPU
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))
    missing = [n for n in names if not any(k.startswith(f"{n}_kernel") for k in kernels)]
    assert missing == [], missing


def _embedded_cuda_source(lib_bytes: bytes) -> str:
    """The CUDA source TVM embeds in a library built without a GPU (a length-prefixed string)."""
    at = lib_bytes.find(b'extern "C" __global__')
    start = lib_bytes.rfind(b"\x00", 0, at) + 1
    return lib_bytes[start:lib_bytes.find(b"\x00", at)].decode()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_the_embedded_cuda_source_compiles_when_the_library_loads(tmp_path, monkeypatch):
    """What a GPU machine does at load: the runtime calls tvm_callback_cuda_compile on the library's source; ours
    compiles it with nvcc for the GPU's arch (forced to sm_90a here) and caches the fatbin."""
    import tvm_ffi

    from mlc_llm.serve import runner

    _, lib = _cuda_sampling_library(tmp_path)
    code = _embedded_cuda_source(lib.read_bytes())
    assert "parallel_sampling_from_prob_kernel" in code
    monkeypatch.setenv("MLC_LLM_CUDA_ARCH", "sm_90a")
    monkeypatch.setenv("MLC_LLM_HOME", str(tmp_path / "cache"))
    runner._use_our_cuda_compiler()
    fatbin = bytes(tvm_ffi.get_global_func("tvm_callback_cuda_compile")(code))
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # the fatbin magic
    cached = list((tmp_path / "cache" / "cuda").glob("*.fatbin"))
    assert len(cached) == 1 and cached[0].read_bytes() == fatbin
    assert runner.compile_cuda_source(code) == fatbin  # from the cache


# ---- through the engine, on the real model -------------------------------------------------------------------------
PROMPTS = ["What is the capital of France?", "Write a haiku about autumn.", "List three prime numbers.",
           "Explain what a compiler does."]


def _answers(engine, kw):
    import concurrent.futures as cf

    def one(i):
        r = engine.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=24,
                                           logprobs=True, **kw(i))
        return r.choices[0].message.content, [c.logprob for c in r.choices[0].logprobs.content]

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched: the four decode together
        return list(pool.map(one, range(len(PROMPTS))))


def test_engine_samples_on_the_library_like_the_host(smollm_q4):
    from mlc_llm import MLCEngine

    runs = {}
    for sampler in ("host", "device"):
        engine = MLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), mode="server",
                           overrides=f"max_num_sequence=4;sampler={sampler}")
        assert engine.config.sampler == sampler
        runs[sampler] = (_answers(engine, lambda i: {"temperature": 0}),
                         _answers(engine, lambda i: {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i}),
                         _answers(engine, lambda i: {"temperature": 1.0, "seed": 7 * i}))
        steps = engine.metrics()["decode_steps"]
        engine.terminate()
        assert steps > 0
    for (h_text, h_lp), (d_text, d_lp) in zip(sum(runs["host"], []), sum(runs["device"], [])):
        assert d_text == h_text  # greedy, and seeded draws: the same uniform gives the same token
        # which requests share a decode step differs between runs, and batch size changes the kernels' summation
        # order: logits agree to ~1e-4, not bit for bit
        np.testing.assert_allclose(d_lp, h_lp, atol=2e-3)


def test_sampler_option_is_checked():
    from mlc_llm.serve.config import EngineConfig

    with pytest.raises(ValueError, match="unknown sampler 'gpu'"):
        EngineConfig(sampler="gpu")
    assert EngineConfig().with_overrides("sampler=device").sampler == "device"
