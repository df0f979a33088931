"""Structured-config schemas. OmegaConf checks types, enum values and unknown keys; `check()` checks the rest."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from omegaconf import MISSING


class DeviceName(Enum):
    cpu = "cpu"
    cuda = "cuda"


class QuantName(Enum):
    q0f32 = "q0f32"
    q0f16 = "q0f16"
    q4f16_1 = "q4f16_1"
    q4f32_1 = "q4f32_1"
    q4f32_cpu = "q4f32_cpu"
    q4f32_cpu_f16scale = "q4f32_cpu_f16scale"


class ModeName(Enum):
    local = "local"
    interactive = "interactive"
    server = "server"


def _positive(key: str, value: Optional[int]) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{key}: must be a positive integer, got {value}")


@dataclass
class ModelConfig:
    name: str = MISSING  # artifact folder name: artifacts/<name>-<quantization>/
    source: str = MISSING  # pypkg:<pkg>/<file> | models:<file> | HF://<org>/<repo> | random:<preset> | local path
    install_hint: str = ""  # shown when a pypkg: or models: source is missing
    context_window_size: Optional[int] = None  # None: the model's own
    prefill_chunk_size: Optional[int] = None
    max_batch_size: int = 128
    temperature: Optional[float] = None  # default sampling settings; None: the source's generation config or 1.0
    top_p: Optional[float] = None

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"model.name: '{self.name}' must be a plain folder name")
        for key in ("context_window_size", "prefill_chunk_size", "max_batch_size"):
            _positive(f"model.{key}", getattr(self, key))
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise ValueError(f"model.temperature: must be in [0, 2], got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"model.top_p: must be in (0, 1], got {self.top_p}")


@dataclass
class QuantizationConfig:
    name: QuantName = MISSING


@dataclass
class ConvTemplateConfig:
    name: str = MISSING
    system_message: Optional[str] = None  # None: the template's default

    def check(self) -> None:
        from ..conversation import get_conv_template

        try:
            get_conv_template(self.name)
        except ValueError as e:
            raise ValueError(f"conv_template.name: {e}") from None


# Precisions of the CPU kernels: f32; bf16 (AMX prefill, compiler/cpu_q4_blocked.py); int8 (VNNI,
# compiler/cpu_q4_int8.py). The compiler validates against these too. The first of each tuple is the default, the
# only value off the CPU.
PREFILL_PRECISIONS = ("f32", "bf16", "int8")
DECODE_PRECISIONS = ("f32", "int8")
# dtype of the KV cache's pages: auto = the model's; float16 halves the bytes of a float32 model's cache (CPU)
KV_CACHE_DTYPES = ("auto", "float16")


def library_suffix(prefill_precision: str, decode_precision: str, kv_cache_dtype: str = "auto") -> str:
    """The part of a library's file name after the device for non-default precisions: -bf16 / -prefill-int8, then
    -int8 for int8 decode, then -kv16 for a float16 KV cache (cpu-int8.so, cpu-prefill-int8-int8.so, cpu-kv16.so,
    ...)."""
    prefill = {"f32": "", "bf16": "-bf16"}.get(prefill_precision, f"-prefill-{prefill_precision}")
    return (prefill + ("" if decode_precision == "f32" else f"-{decode_precision}")
            + ("" if kv_cache_dtype == "auto" else "-kv16"))


@dataclass
class DeviceConfig:
    name: DeviceName = MISSING
    arch: Optional[str] = None  # CUDA arch, e.g. sm_90
    num_threads: Optional[int] = None  # CPU threads for the runtime (TVM_NUM_THREADS)
    # CPU prefill GEMMs: f32 (float32-level logits), bf16 (AMX tiles, inputs rounded to bfloat16, ~1.5x faster) or
    # int8 (AVX512-VNNI, activations quantized per 32 values as llama.cpp's prompt processing)
    prefill_precision: str = "f32"
    # CPU decode GEMVs: f32, or int8 activations on AVX512-VNNI (faster decode, logits within ~1 %)
    decode_precision: str = "f32"
    # KV cache pages: auto (the model's dtype) or float16 (CPU: half the bytes per token that a float32 model's
    # attention reads; q, k, v and the attention output rounded to float16, as llama.cpp's default cache)
    kv_cache_dtype: str = "auto"
    # CPU weights in memory advised for transparent huge pages (Linux; false: TVM's loader, 4 KB pages)
    huge_pages: bool = True

    def check(self) -> None:
        if self.arch is not None and self.name is not DeviceName.cuda:
            raise ValueError("device.arch: only meaningful for cuda")
        for key, allowed in (("prefill_precision", PREFILL_PRECISIONS), ("decode_precision", DECODE_PRECISIONS),
                             ("kv_cache_dtype", KV_CACHE_DTYPES)):
            value, default = getattr(self, key), allowed[0]
            if value not in allowed:
                raise ValueError(f"device.{key}: '{value}' is not one of {', '.join(allowed)}")
            if value != default and self.name is not DeviceName.cpu:
                raise ValueError(f"device.{key}: {value} is an option of the CPU build (cuda takes {default})")
        if self.arch is not None and not (self.arch.startswith("sm_") and self.arch[3:].rstrip("a").isdigit()):
            raise ValueError(f"device.arch: '{self.arch}' is not a CUDA arch like sm_80 or sm_90")
        _positive("device.num_threads", self.num_threads)

    @property
    def spec(self) -> str:
        """The --device string of the CLI steps."""
        return f"{self.name.value}:{self.arch}" if self.arch else self.name.value


@dataclass
class ModeConfig:
    name: ModeName = MISSING
    max_num_sequence: Optional[int] = None
    max_total_sequence_length: Optional[int] = None
    prefill_chunk_size: Optional[int] = None
    gpu_memory_utilization: float = 0.85
    prefix_cache_mode: str = "radix"  # radix | disable
    speculative_mode: str = "disable"  # disable | ngram
    spec_draft_length: Optional[int] = None  # N: N drafts every step; null or 0: auto (up to 4, while it pays)
    draft: Optional[str] = None  # small_draft: the deployment whose model drafts (same tokenizer, same device)

    def check(self) -> None:
        for key in ("max_num_sequence", "max_total_sequence_length", "prefill_chunk_size"):
            _positive(f"mode.{key}", getattr(self, key))
        from ..serve.config import EngineConfig

        try:  # the engine's own rules, named as the config names them
            EngineConfig(prefix_cache_mode=self.prefix_cache_mode, speculative_mode=self.speculative_mode,
                         spec_draft_length=self.spec_draft_length,
                         additional_models=[self.draft] if self.draft else None)
        except ValueError as e:
            raise ValueError(f"mode: {e}") from None
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"mode.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class ServerConfig:
    """Where `serve_<deployment>` listens. The API key is read from $MLC_LLM_API_KEY (never from a config file)."""
    host: str = "127.0.0.1"
    port: int = 8000
    ui: bool = True  # the chat page at http://host:port/
    # engine mode of serve_<deployment> (null: the deployment's mode, but `local` for an `interactive` one: a server
    # batches concurrent requests, a terminal chat has one)
    mode: Optional[str] = None
    backend: str = "local"  # local: one engine in the server process; ray: `replicas` engines behind Ray Serve
    replicas: int = 1
    ray_address: Optional[str] = None  # backend ray: join this cluster (null: start a local one)

    def check(self) -> None:
        if self.backend not in ("local", "ray"):
            raise ValueError(f"server.backend: '{self.backend}' is not one of local, ray")
        if not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise ValueError(f"server.replicas: must be a positive integer, got {self.replicas}")
        if self.backend == "local" and (self.replicas != 1 or self.ray_address):
            raise ValueError("server.replicas and server.ray_address need server.backend: ray")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"server.port: must be a TCP port (1-65535), got {self.port}")
        if not self.host or any(c.isspace() for c in self.host):
            raise ValueError(f"server.host: '{self.host}' is not a host name or address")
        if self.mode not in (None, "local", "interactive", "server"):
            raise ValueError(f"server.mode: '{self.mode}' is not one of local, interactive, server (or null)")


@dataclass
class BuildConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    conv_template: ConvTemplateConfig = field(default_factory=ConvTemplateConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    artifacts_dir: str = "artifacts"

    def check(self) -> "BuildConfig":
        """Value checks beyond types (OmegaConf calls no __post_init__ we could rely on with MISSING defaults)."""
        for part in (self.model, self.conv_template, self.device, self.mode, self.server):
            part.check()
        return self

    @property
    def model_dir(self) -> str:
        return f"{self.artifacts_dir}/{self.model.name}-{self.quantization.name.value}"

    @property
    def model_lib(self) -> str:
        dev = self.device.name.value + (f"-{self.device.arch}" if self.device.arch else "")
        dev += library_suffix(self.device.prefill_precision, self.device.decode_precision, self.device.kv_cache_dtype)
        return f"{self.model_dir}/lib/{dev}.so"
