"""`mlc_llm <command>`: one argparse front for every step (flags as in the original MLC LLM)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parse_compile_overrides(text: str) -> dict[str, int]:
    allowed = ("context_window_size", "prefill_chunk_size", "max_batch_size")
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"bad --overrides item '{item}' (allowed keys: {', '.join(allowed)})")
        out[key] = _positive_int(value)
    return out


def cmd_gen_config(a) -> None:
    from .steps.gen_config import gen_config

    path = gen_config(a.model, a.quantization, a.conv_template, a.output,
                      context_window_size=a.context_window_size, prefill_chunk_size=a.prefill_chunk_size,
                      max_batch_size=a.max_batch_size, tensor_parallel_shards=a.tensor_parallel_shards,
                      system_message=a.system_message, install_hint=a.install_hint,
                      temperature=a.temperature, top_p=a.top_p)
    print(f"wrote {path}")


def cmd_convert_weight(a) -> None:
    from .steps.convert_weight import convert_weight

    path = convert_weight(a.model, a.quantization, a.output, install_hint=a.install_hint,
                          progress=not a.no_progress)
    print(f"wrote {path}")


def cmd_compile(a) -> None:
    from .steps.compile import compile_model

    overrides = _parse_compile_overrides(a.overrides) if a.overrides else None
    from .config.schema import library_suffix

    suffix = library_suffix(a.prefill_precision, a.decode_precision, a.kv_cache_dtype)
    output = a.output or str(Path(a.model) / "lib" / f"{a.device.replace(':', '-')}{suffix}.so")
    path = compile_model(a.model, a.device, output, overrides=overrides, prefill_precision=a.prefill_precision,
                         decode_precision=a.decode_precision, kv_cache_dtype=a.kv_cache_dtype)
    print(f"wrote {path}")


def cmd_build(a) -> int:
    from .build import build, list_deployments

    if a.list:
        list_deployments()
        return 0
    return build(a.deployment, a.overrides, cores=a.cores, dry_run=a.dry_run, force=a.force, workdir=a.workdir)


def cmd_generate(a) -> None:
    """Greedy generation through the paged KV cache: the minimal check that artifacts run."""
    import time

    from .conversation import JINJA, Conversation
    from .serve.runner import ModelRunner
    from .tokenizer import Tokenizer

    _check_model_paths(a, chat=True)
    model_lib = a.model_lib or str(Path(a.model) / "lib" / f"{a.device}.so")
    runner = ModelRunner(a.model, model_lib, a.device)
    tok = Tokenizer(a.model)
    conv = Conversation.from_dict(runner.chat_config["conv_template"])
    messages = [{"role": "user", "content": a.prompt}]
    if a.raw:
        text = a.prompt
    else:  # the named template, or (jinja) the model's own chat template
        text = tok.render_chat(messages) if conv.name == JINJA else conv.as_prompt(messages)
    ids = list(conv.system_prefix_token_ids or []) if not a.raw else []
    ids += tok.encode(text)
    start = time.perf_counter()
    out = runner.greedy_generate(ids, a.max_tokens, conv.stop_token_ids)
    elapsed = time.perf_counter() - start
    if out and out[-1] in conv.stop_token_ids:
        out = out[:-1]
    print(tok.decode(out))
    print(f"[{len(ids)} prompt tokens, {len(out)} generated, {elapsed:.2f} s]", file=sys.stderr)


def _json_list(text: str) -> list[str]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); give a list such as '[\"*\"]'") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings, got {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {value}")
    return value


_ENGINE_FLAGS = ("prefix_cache_mode", "prefix_cache_max_num_recycling_seqs", "speculative_mode", "spec_draft_length")


def _fold_engine_flags(a) -> None:
    """--speculative-mode X etc. become engine overrides (checked with the others by EngineConfig)."""
    items = [f"{k}={getattr(a, k)}" for k in _ENGINE_FLAGS if getattr(a, k, None) is not None]
    drafts = getattr(a, "additional_models", None) or []
    if len(drafts) > 1:
        raise ValueError(f"--additional-models: one draft model (DIR or DIR,LIB), got {len(drafts)}")
    items += [f"additional_models={d}" for d in drafts]
    if items:
        a.overrides = ";".join(filter(None, [a.overrides, *items]))


def _check_unsupported_runtime_flags(a) -> None:
    if getattr(a, "enable_tracing", False):
        raise ValueError("--enable-tracing is not supported yet; per-request timings are in each response's "
                         "usage.extra and in GET /metrics")


def _check_model_paths(a, chat: bool = False) -> None:
    """`chat`: the command generates text, which an embedding model cannot."""
    import json

    from .serve.engine import _resolve_model_dir

    model_dir = _resolve_model_dir(a.model)
    task = json.loads((model_dir / "mlc-chat-config.json").read_text(encoding="utf-8")).get("model_task", "chat")
    if chat and task == "embedding":
        raise ValueError(f"'{a.model}' is an embedding model: it generates no text; serve it (`mlc_llm serve`) for "
                         "/v1/embeddings")
    if a.model_lib and not Path(a.model_lib).is_file():
        raise FileNotFoundError(f"--model-lib {a.model_lib}: no such file")
    if a.model_lib:
        from .serve.runner import _verify_library

        _verify_library(Path(a.model_lib))  # a damaged library: one line now, not a crash once loading
    from .serve.config import EngineConfig

    if hasattr(a, "mode"):  # bad engine overrides fail here, before anything loads
        EngineConfig(mode=a.mode).with_overrides(a.overrides)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT does not count
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? --port)") from None


def cmd_serve(a) -> None:
    from .serve.server import ServerSettings, serve

    import os

    _check_unsupported_runtime_flags(a)
    _fold_engine_flags(a)
    _check_model_paths(a)
    settings = ServerSettings(api_key=a.api_key or os.environ.get("MLC_LLM_API_KEY") or None,
                              allow_credentials=a.allow_credentials, allowed_origins=a.allowed_origins,
                              allowed_methods=a.allowed_methods, allowed_headers=a.allowed_headers, ui=not a.no_ui,
                              strict_model_name=a.strict_model_name, allowed_hosts=a.allowed_hosts,
                              max_queued_requests=a.max_queued_requests, shutdown_timeout=a.shutdown_timeout,
                              header_timeout=a.header_timeout, body_timeout=a.body_timeout,
                              request_timeout=a.request_timeout)
    settings.check()
    if a.backend == "local" and (a.replicas != 1 or a.ray_address):
        raise ValueError("--replicas and --ray-address need --backend ray (the local server is one engine)")
    _check_port_free(a.host, a.port)
    if a.backend == "ray":
        try:
            from .serve.ray_serve import serve_ray
        except ImportError as e:  # one line, not a traceback: the extra is not installed
            raise ValueError(f"--backend ray needs Ray Serve ({e}): pip install -e '.[ray]'") from None
        serve_ray(a.model, a.model_lib, a.device, a.mode, a.overrides, a.host, a.port, settings,
                  served_model_name=a.served_model_name, replicas=a.replicas, ray_address=a.ray_address,
                  log_level=a.log_level)
        return
    serve(a.model, a.model_lib, a.device, a.mode, a.overrides, a.host, a.port, settings,
          served_model_name=a.served_model_name, log_level=a.log_level)


def cmd_chat(a) -> int:
    from .chat import run_chat

    _fold_engine_flags(a)
    _check_model_paths(a, chat=True)
    return run_chat(a.model, a.model_lib, a.device, a.overrides)


def cmd_bench(a) -> int:
    if a.bench == "serve":
        from .bench_serve import bench_serve

        results = bench_serve(a.base_url, a.model, a.concurrency, a.num_prompts, a.input_len, a.output_len,
                              a.endpoint == "chat", a.vocab_size, a.seed, a.api_key, a.result_json)
        return 1 if any(r["failed"] for r in results) else 0
    if a.bench == "latency":
        from .bench_latency import bench_latency

        _check_model_paths(a, chat=True)
        bench_latency(a.model, a.model_lib, a.device, a.prompt_len, a.gen_len, a.repeat, a.profile,
                      a.profile_context, a.profile_batch, a.result_json, a.profile_prefill or 0)
        return 0
    raise ValueError(f"unknown benchmark '{a.bench}'")


def _runtime_flags(p: argparse.ArgumentParser, default_mode: str) -> None:
    p.add_argument("model", help="artifact folder (mlc-chat-config.json + weights) or HF://org/repo in the local cache")
    p.add_argument("--model-lib", help="compiled library (default: compiled on first use into $MLC_LLM_HOME)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--overrides", help='engine settings, e.g. "max_num_sequence=8;max_total_seq_length=4096"')
    p.add_argument("--prefix-cache-mode", choices=["radix", "disable"],
                   help="keep finished sequences' KV for requests sharing a prefix (default: radix)")
    p.add_argument("--prefix-cache-max-num-recycling-seqs", type=int,
                   help="finished sequences the prefix cache keeps (default: max_num_sequence; -1: no limit)")
    p.add_argument("--speculative-mode", help="disable (default) | ngram (drafts from the sequence's own tokens) | "
                                              "small_draft (drafts from --additional-models)")
    p.add_argument("--spec-draft-length", type=int, help="N: N draft tokens every step; 0 (default): auto, up to 4 "
                                                        "while measured to be faster")
    if default_mode:
        p.add_argument("--mode", default=default_mode, choices=["local", "interactive", "server"])


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlc_llm", description="Compile and run LLMs with Apache TVM.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gen_config", help="write mlc-chat-config.json and tokenizer files")
    g.add_argument("model", help="GGUF file, HF folder, HF://org/repo (local cache), pypkg:<pkg>/<file>, "
                                 "models:<file> (scripts/fetch_models.sh), or random:<preset>")
    g.add_argument("--quantization", required=True)
    g.add_argument("--conv-template", required=True)
    g.add_argument("--context-window-size", type=_positive_int)
    g.add_argument("--prefill-chunk-size", type=_positive_int)
    g.add_argument("--max-batch-size", type=_positive_int, default=128)
    g.add_argument("--tensor-parallel-shards", type=_positive_int, default=1)
    g.add_argument("--system-message", help="replace the template's default system message")
    g.add_argument("--temperature", type=float, help="default temperature (else the source's, else 1.0)")
    g.add_argument("--top-p", type=float, help="default top_p (else the source's, else 1.0)")
    g.add_argument("--install-hint", default="", help=argparse.SUPPRESS)
    g.add_argument("-o", "--output", required=True)
    g.set_defaults(func=cmd_gen_config)

    c = sub.add_parser("convert_weight", help="quantize weights into tensor-cache.json + params_shard_*.bin")
    c.add_argument("model")
    c.add_argument("--quantization", required=True)
    c.add_argument("--install-hint", default="", help=argparse.SUPPRESS)
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=cmd_convert_weight)

    m = sub.add_parser("compile", help="compile the model library for a device")
    m.add_argument("model", help="folder with mlc-chat-config.json")
    m.add_argument("--device", default="cpu", help="cpu | cuda | cuda:sm_XX")
    m.add_argument("--overrides", help='"context_window_size=N;prefill_chunk_size=N;max_batch_size=N"')
    m.add_argument("--prefill-precision", default="f32", choices=["f32", "bf16", "int8"],
                   help="CPU: prefill GEMMs with float32-level accuracy (f32, default), on bfloat16-rounded inputs "
                        "(bf16, CPUs with AMX: ~1.5x faster prefill, logits within ~0.2) or on int8 activations (int8, "
                        "AVX512-VNNI: logits within ~1%%)")
    m.add_argument("--decode-precision", default="f32", choices=["f32", "int8"],
                   help="CPU with AVX512-VNNI: decode GEMVs with float32 activations (f32, default) or int8 ones "
                        "quantized per 32 values (int8: faster decode, logits within ~1%%)")
    m.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"],
                   help="CPU: KV cache pages in the model's dtype (auto, default) or float16 (half the bytes a decode "
                        "step's attention reads; q, k, v and the attention output rounded to float16)")
    m.add_argument("-o", "--output",
                   help="library path (default: MODEL/lib/<device>[-bf16|-prefill-int8][-int8][-kv16].so)")
    m.set_defaults(func=cmd_compile)

    b = sub.add_parser("build", help="build a deployment's artifacts through the Snakemake pipeline")
    b.add_argument("deployment", nargs="?", help="name in configs/deployments.yaml (default: its default)")
    b.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. quantization=q0f32")
    b.add_argument("--cores", type=_positive_int, default=2)
    b.add_argument("--dry-run", "-n", action="store_true")
    b.add_argument("--force", action="store_true", help="rebuild every step of the deployment")
    b.add_argument("--list", action="store_true", help="list the deployments and exit")
    b.add_argument("--workdir", type=Path, help="where artifacts/ and .snakemake/ go (default: the repository)")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("generate", help="greedy generation: check that built artifacts run")
    r.add_argument("model", help="artifact folder")
    r.add_argument("--model-lib", help="library (default: MODEL/lib/<device>.so)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--prompt", required=True)
    r.add_argument("--raw", action="store_true", help="no chat template")
    r.add_argument("--max-tokens", type=_positive_int, default=64)
    r.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible REST server")
    _runtime_flags(s, "local")
    s.add_argument("--additional-models", nargs="*",
                   help="the draft model of --speculative-mode small_draft: DIR or DIR,LIB (same tokenizer)")
    s.add_argument("--enable-tracing", action="store_true", help="(not supported yet)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    s.add_argument("--allowed-origins", type=_json_list, default=[],
                   help='CORS: web origins allowed to call the server, JSON list (default: none; \'["*"]\': any)')
    s.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS methods, JSON list")
    s.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS headers, JSON list")
    s.add_argument("--allowed-hosts", type=_json_list, default=None,
                   help='Host header values served, JSON list (default: localhost names when --host is loopback, '
                        'else any)')
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* and /reset_prefix_cache (prefer $MLC_LLM_API_KEY: a "
                                     "flag shows in the process list)")
    s.add_argument("--served-model-name", help="the model id clients use (default: MODEL as given)")
    s.add_argument("--no-ui", action="store_true", help="do not serve the chat page at /")
    s.add_argument("--max-queued-requests", type=_positive_int, default=None,
                   help="requests waiting for a slot before new ones get 429 + Retry-After (default: 8 per sequence "
                        "slot of the engine's mode)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds running requests get to finish before they end with an error (default 10)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="close a connection whose request headers are not all in after this many seconds (default 10)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="answer 408 when no part of a request body arrives for this many seconds (default 30)")
    s.add_argument("--request-timeout", type=float, default=None,
                   help="end a request that takes longer than this many seconds, queue included (504, or an in-band "
                        "error event in a stream; default: no limit)")
    s.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: one engine in this process; ray: --replicas engines behind Ray Serve (pip install "
                        "-e '.[ray]'; threads per replica: TVM_NUM_THREADS, default cores / replicas)")
    s.add_argument("--replicas", type=_positive_int, default=1, help="engine replicas of --backend ray (default 1)")
    s.add_argument("--ray-address", default=None,
                   help="--backend ray: join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting "
                        "a local one")
    s.add_argument("--strict-model-name", action="store_true",
                   help="answer 404 to requests naming another model (default: the served model answers them)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="interactive chat in the terminal (also reads piped stdin)")
    _runtime_flags(ch, "")
    ch.set_defaults(func=cmd_chat, mode="interactive")

    bn = sub.add_parser("bench", help="benchmarks")
    bsub = bn.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("serve", help="closed-loop serving benchmark against a running OpenAI-compatible server "
                                       "(vLLM's metric names)")
    bs.add_argument("--base-url", default="http://127.0.0.1:8000")
    bs.add_argument("--model", help="model id to request (default: the server's first in /v1/models)")
    bs.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                    help="completions: random token-id prompts of exact length; chat: random words")
    bs.add_argument("--concurrency", type=_positive_int, nargs="+", default=[1, 4, 8])
    bs.add_argument("--num-prompts", type=_positive_int, help="requests per concurrency level (default: 2 x level)")
    bs.add_argument("--input-len", type=_positive_int, default=128)
    bs.add_argument("--output-len", type=_positive_int, default=128)
    bs.add_argument("--vocab-size", type=_positive_int, default=32000, help="random prompt ids are below this")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--api-key", default=None)
    bs.add_argument("--result-json", help="write every level's metrics here")
    bs.set_defaults(func=cmd_bench)
    bl = bsub.add_parser("latency", help="prefill / decode tok/s through the engine (llama-bench style) and a "
                                         "per-kernel profile of one decode step")
    bl.add_argument("model")
    bl.add_argument("--model-lib")
    bl.add_argument("--device", default="auto")
    bl.add_argument("--prompt-len", type=_positive_int, nargs="+", default=[128, 512])
    bl.add_argument("--gen-len", type=_positive_int, default=128)
    bl.add_argument("--repeat", type=_positive_int, default=5)
    bl.add_argument("--profile", action="store_true", help="also time every kernel of one decode step")
    bl.add_argument("--profile-context", type=_positive_int, default=128)
    bl.add_argument("--profile-batch", type=_positive_int, default=1)
    bl.add_argument("--profile-prefill", type=_positive_int, metavar="N",
                    help="also time every kernel of one prefill of N tokens (N <= the model's prefill_chunk_size)")
    bl.add_argument("--result-json")
    bl.set_defaults(func=cmd_bench, mode="local", overrides=None)
    return p


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors reported as one line. The build side's error types are skipped where its dependencies are not installed
    (the runtime-only environment of scripts/gpu/ has no omegaconf, gguf or TVM compiler)."""
    import importlib

    errors: list[type[BaseException]] = [ValueError, FileNotFoundError, KeyError]
    for module, name in ((".config", "ConfigError"), (".loader", "SourceError"), (".tensor_cache", "TensorCacheError"),
                         (".steps.compile", "CompileError"), (".serve.runner", "RuntimeLoadError")):
        try:
            errors.append(getattr(importlib.import_module(module, __package__), name))
        except ImportError:
            pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    expected = _expected_errors()
    try:
        rc = args.func(args)
    except expected as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mlc_llm {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mlc_llm {args.command}: interrupted", file=sys.stderr)
        return 130
    return rc or 0
