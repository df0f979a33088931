"""Parse-time plan of the Snakemake pipeline: which artifacts each deployment needs and the exact step commands.

The Snakefile only turns this plan into rules, so the logic is plain Python that tests can call. Rerun triggers:
- each step's command line is a rule param: a changed config value that reaches a step changes its command;
- each step's code hash is a param: editing the build code of a step reruns that step only;
- compile reads mlc-chat-config.json as `ancient` (order only): a changed chat template does not recompile; what
  the library does depend on goes through a stamp file (see pipelines/build.smk).
"""
from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import BuildConfig, ConfigError, compose_deployment, load_deployments
from .config.compose import build_all_names, check_build_all
from .loader import SourceError, resolve_source

PACKAGE = Path(__file__).resolve().parent

# The package files each step's output depends on (besides its command line).
STEP_CODE = {
    "gen_config": ["loader", "model", "conversation.py", "quantization/scheme.py", "steps/gen_config.py",
                   "support.py"],
    "convert_weight": ["loader", "model", "quantization", "tensor_cache.py", "steps/convert_weight.py"],
    "compile": ["model", "quantization", "compiler", "steps/compile.py", "steps/gen_config.py"],
}


def code_hash(step: str) -> str:
    h = hashlib.sha256()
    for rel in STEP_CODE[step]:
        p = PACKAGE / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(str(f.relative_to(PACKAGE)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cmd(*parts: Any) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts if p is not None)


def _opt(flag: str, value: Any) -> list[Any]:
    return [flag, value] if value is not None else []


@dataclass
class ModelArtifact:
    key: str
    dir: str
    source: str
    install_hint: str
    gen_config_cmd: str
    convert_cmd: str
    deployments: list[str] = field(default_factory=list)

    @property
    def chat_config(self) -> str:
        return f"{self.dir}/mlc-chat-config.json"

    @property
    def tensor_cache(self) -> str:
        return f"{self.dir}/tensor-cache.json"

    def shard_files(self) -> list[str]:
        """The weight shards tensor-cache.json names (none before the first conversion): outputs of convert_weight,
        so a deleted or missing shard reruns the conversion instead of failing at load time."""
        import json

        try:
            records = json.loads(Path(self.tensor_cache).read_text(encoding="utf-8")).get("records", [])
            return sorted({f"{self.dir}/{r['dataPath']}" for r in records})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []

    def convert_mem_mb(self) -> int:
        """Memory a conversion job asks a cluster for: the source weights about three times over (read, converted,
        quantized) plus the interpreter; 2 GiB at least."""
        try:
            _, location = resolve_source(self.source, self.install_hint)
            p = Path(location)
            size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        except (SourceError, OSError, TypeError):
            size = 0
        return max(2048, 3 * size // 2**20 + 1024)

    def source_inputs(self) -> list[str]:
        """The source file (so replacing it reruns the steps); none for random or missing sources, where the step
        itself reports what is missing."""
        try:
            kind, location = resolve_source(self.source, self.install_hint)
        except SourceError:
            return []
        return [location] if kind == "gguf" else []


@dataclass
class LibArtifact:
    key: str
    path: str
    model: ModelArtifact
    compile_cmd: str
    compile_inputs: str  # the config values the library depends on beyond its command line (a rerun trigger)
    deployments: list[str] = field(default_factory=list)

    @property
    def stamp(self) -> str:
        return f"{self.path}.inputs"


@dataclass
class Plan:
    default: str
    deployments: dict[str, BuildConfig]
    models: dict[str, ModelArtifact]
    libs: dict[str, LibArtifact]
    code: dict[str, str]
    build_all: list[str] = field(default_factory=list)  # the deployments of the build_all target
    compile_threads: Optional[int] = None  # threads of a compile job (None: all of --cores); a cluster profile sets it

    def lib_of(self, deployment: str) -> LibArtifact:
        cfg = self.deployments[deployment]
        return self.libs[cfg.model_lib]

    def build_inputs(self, deployment: str) -> list[str]:
        lib = self.lib_of(deployment)
        draft = self.deployments[deployment].mode.draft
        return [lib.model.chat_config, lib.model.tensor_cache, lib.path] + (self.build_inputs(draft) if draft else [])

    def build_all_inputs(self) -> list[str]:
        return list(dict.fromkeys(f for name in self.build_all for f in self.build_inputs(name)))

    def runtime_inputs(self, deployment: str) -> list[str]:
        """Every file the engine opens, so a launch rebuilds whatever is missing first."""
        draft = self.deployments[deployment].mode.draft
        return self.build_inputs(deployment) + self.lib_of(deployment).model.shard_files() + \
            (self.lib_of(draft).model.shard_files() if draft else [])

    def launch_cmd(self, deployment: str, kind: str) -> str:
        """The process a `serve_<name>` / `chat_<name>` target execs once everything is built."""
        draft = self.deployments[deployment].mode.draft
        return launch_command(self.deployments[deployment], kind, self.deployments[draft] if draft else None)

    def launch_target(self, targets) -> tuple[str, str] | None:
        """(deployment, kind) when the run's targets include serve_<name> / chat_<name>, else None."""
        found = []
        for t in targets or ():
            kind, _, name = str(t).partition("_")
            if kind in ("serve", "chat") and name in self.deployments:
                found.append((name, kind))
        if len(found) > 1:
            raise ConfigError(f"one launch target at a time, got {', '.join(f'{k}_{n}' for n, k in found)}")
        return found[0] if found else None


def _rule_key(path: str) -> str:
    return re.sub(r"\W", "_", path.split("/", 1)[-1])


def step_commands(cfg: BuildConfig) -> tuple[str, str, str, str]:
    """Shell commands of the three steps. `python` is the interpreter running Snakemake (the Snakefile puts its
    folder first on PATH), so a moved virtualenv does not count as a changed command."""
    m, q = cfg.model, cfg.quantization.name.value
    mlc = ["python", "-m", "mlc_llm"]
    gen = _cmd(*mlc, "gen_config", m.source, "--quantization", q, "--conv-template", cfg.conv_template.name,
               *_opt("--context-window-size", m.context_window_size),
               *_opt("--prefill-chunk-size", m.prefill_chunk_size), "--max-batch-size", m.max_batch_size,
               *_opt("--system-message", cfg.conv_template.system_message),
               *_opt("--temperature", m.temperature), *_opt("--top-p", m.top_p),
               *_opt("--install-hint", m.install_hint or None), "-o", cfg.model_dir)
    convert = _cmd(*mlc, "convert_weight", m.source, "--quantization", q,
                   *_opt("--install-hint", m.install_hint or None), "-o", cfg.model_dir)
    prefill, decode, kv = cfg.device.prefill_precision, cfg.device.decode_precision, cfg.device.kv_cache_dtype
    compile_ = _cmd(*mlc, "compile", cfg.model_dir, "--device", cfg.device.spec,
                    *_opt("--prefill-precision", prefill if prefill != "f32" else None),
                    *_opt("--decode-precision", decode if decode != "f32" else None),
                    *_opt("--kv-cache-dtype", kv if kv != "auto" else None), "-o", cfg.model_lib)
    # What the library depends on: model shapes (source), quantization, compile-time bounds.
    compile_inputs = " ".join(f"{k}={v}" for k, v in (
        ("source", m.source), ("quantization", q), ("context_window_size", m.context_window_size),
        ("prefill_chunk_size", m.prefill_chunk_size), ("max_batch_size", m.max_batch_size)))
    return gen, convert, compile_, compile_inputs


def engine_overrides(cfg: BuildConfig, draft: Optional[BuildConfig] = None) -> str:
    m = cfg.mode
    items = [(k, getattr(m, k)) for k in ("max_num_sequence", "max_total_sequence_length", "prefill_chunk_size",
                                          "spec_draft_length")]
    items += [(k, getattr(m, k)) for k, default in (("prefix_cache_mode", "radix"), ("speculative_mode", "disable"))
              if getattr(m, k) != default]
    if cfg.device.name.value != "cpu":  # a share of GPU memory; the CPU sizes from available RAM
        items.append(("gpu_memory_utilization", m.gpu_memory_utilization))
    if draft is not None:
        items.append(("additional_models", f"{draft.model_dir},{draft.model_lib}"))
    return ";".join(f"{k}={v}" for k, v in items if v is not None)


def serve_mode(cfg: BuildConfig) -> str:
    """The engine mode of serve_<deployment>: server.mode, else the deployment's, with `interactive` (one sequence,
    for a terminal chat) raised to `local` so that a server batches concurrent requests."""
    mode = cfg.mode.name.value
    return cfg.server.mode or ("local" if mode == "interactive" else mode)


def launch_command(cfg: BuildConfig, kind: str, draft: Optional[BuildConfig] = None) -> str:
    env = ([f"TVM_NUM_THREADS={cfg.device.num_threads}"] if cfg.device.num_threads else []) + \
        ([] if cfg.device.huge_pages else ["MLC_HUGE_PAGES=0"])
    env = ["env", *env] if env else []
    common = [cfg.model_dir, "--model-lib", cfg.model_lib, "--device", cfg.device.name.value,
              "--overrides", engine_overrides(cfg, draft)]
    if kind == "serve":
        return _cmd(*env, "python", "-m", "mlc_llm", "serve", *common, "--mode", serve_mode(cfg),
                    "--host", cfg.server.host, "--port", cfg.server.port, *([] if cfg.server.ui else ["--no-ui"]),
                    *(["--backend", "ray", "--replicas", cfg.server.replicas] if cfg.server.backend == "ray" else []),
                    *_opt("--ray-address", cfg.server.ray_address))
    if kind == "chat":
        return _cmd(*env, "python", "-m", "mlc_llm", "chat", *common)
    raise ValueError(f"unknown launch kind '{kind}'")


def make_plan(snakemake_config: dict[str, Any] | None = None, config_dir: Path | None = None) -> Plan:
    """snakemake_config may hold `deployment` + `overrides` (Hydra override strings for that deployment), and
    `build_all` (deployment names, a list or "a,b": what the build_all target builds)."""
    snakemake_config = snakemake_config or {}
    default, names = load_deployments(config_dir)
    if snakemake_config.get("build_all") is not None:
        build_all = check_build_all(snakemake_config["build_all"], names, "--config build_all")
    else:
        build_all = build_all_names(config_dir)
    compile_threads = snakemake_config.get("compile_threads")
    if compile_threads is not None and not (isinstance(compile_threads, int) and compile_threads > 0):
        raise ConfigError(f"compile_threads must be a positive integer, got {compile_threads!r}")
    target = snakemake_config.get("deployment")
    overrides = snakemake_config.get("overrides") or []
    if isinstance(overrides, str):  # `--config overrides=a=1` arrives as one string
        overrides = [o for o in overrides.split(",") if o]
    if overrides and target is None:
        raise ConfigError(f"overrides {overrides} need deployment=<name> in --config to say which deployment they "
                          f"change (deployments: {', '.join(names)})")
    if target is not None and target not in names:
        raise ConfigError(f"unknown deployment '{target}' (allowed: {', '.join(names)})")
    deployments = {n: compose_deployment(n, overrides if n == target else [], config_dir) for n in names}
    for name, cfg in deployments.items():
        draft = cfg.mode.draft
        if draft is not None and (draft not in deployments or draft == name):
            raise ConfigError(f"deployment '{name}': mode.draft '{draft}' must name another deployment (allowed: "
                              f"{', '.join(n for n in names if n != name)})")
        if draft is not None and deployments[draft].device.name != cfg.device.name:
            raise ConfigError(f"deployment '{name}': its draft '{draft}' is built for "
                              f"{deployments[draft].device.name.value}, not {cfg.device.name.value}")
    models: dict[str, ModelArtifact] = {}
    libs: dict[str, LibArtifact] = {}
    for name, cfg in deployments.items():
        gen, convert, compile_, compile_inputs = step_commands(cfg)
        art = models.get(cfg.model_dir)
        if art is None:
            art = models[cfg.model_dir] = ModelArtifact(_rule_key(cfg.model_dir), cfg.model_dir, cfg.model.source,
                                                        cfg.model.install_hint, gen, convert)
        elif (art.gen_config_cmd, art.convert_cmd) != (gen, convert):
            raise ConfigError(f"deployments {art.deployments[0]} and {name} both build {cfg.model_dir} but with "
                              f"different settings: give one of them another model.name")
        art.deployments.append(name)
        lib = libs.get(cfg.model_lib)
        if lib is None:
            lib = libs[cfg.model_lib] = LibArtifact(_rule_key(cfg.model_lib), cfg.model_lib, art, compile_,
                                                    compile_inputs)
        elif (lib.compile_cmd, lib.compile_inputs) != (compile_, compile_inputs):
            raise ConfigError(f"deployments {lib.deployments[0]} and {name} both build {cfg.model_lib} with "
                              f"different settings")
        lib.deployments.append(name)
    return Plan(default, deployments, models, libs, {s: code_hash(s) for s in STEP_CODE}, build_all,
                compile_threads)
