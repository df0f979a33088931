"""Every GPU check of the CUDA deployment in one call of the lent machine, results under $OUT.

    # on the GPU machine, after scripts/gpu/device_setup.sh reported "installed" (see scripts/gpu/prepare.sh):
    source /root/mlc-gpu/env.sh && python scripts/gpu/device_run.py --out "$OUT"
    # here, on the CPU, the same stages on tiny models (what the script does, not GPU numbers):
    .venv/bin/python scripts/gpu/device_run.py --dry-run --out /tmp/gpu-dry

Stages, in order (each logged to OUT/<stage>.log; OUT/results.json rewritten after each, so a timeout still returns
what was measured; a stage that fails is recorded and the next one runs):
  env        GPU, driver, torch / transformers / TVM runtime versions
  bandwidth  device-to-device copy with PyTorch: bytes read + written per second, the memory ceiling
  logits     SmolLM2 q4f16_1 on CUDA vs the float64 numpy reference recorded on the CPU machine (tolerance 2e-2),
             and the greedy answer to "What is the capital of France?" through MLCEngine with device=auto
  bench      Llama-3-8B shapes, random weights written on the device (q4f16_1 and q0f16): batch-1 decode of 256
             tokens after a 128-token prompt and prefill of 2048 tokens (`mlc_llm bench latency`), decode as a share
             of the ceiling (weight bytes per token / copy bandwidth)
  hf         HF transformers fp16 on the same shapes (random init on the GPU, static KV cache): the same two numbers
  serve      `mlc_llm serve` (q4f16_1 8B) and `mlc_llm bench serve` at concurrency 1/8/32/128, 512-token prompts,
             128 output tokens, ignore_eos: output tok/s, TTFT, TPOT
`--stages` picks some; `--budget-s` stops starting new stages past that many seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
STAGES = ("env", "bandwidth", "logits", "bench", "hf", "serve")
SMOLLM = "SmolLM2-135M-Instruct-q4f16_1"
LLAMA = "Llama-3-8B-random-{q}"


class Run:
    def __init__(self, out: Path, dry: bool, models: Path):
        self.out, self.dry, self.models = out, dry, models
        self.device = "cpu" if dry else "cuda"
        self.results: dict = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
        self.t0 = time.time()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str), encoding="utf-8")

    def sh(self, stage: str, cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command, its output appended to OUT/<stage>.log; raise with the log's tail on failure."""
        with open(self.out / f"{stage}.log", "a") as log:
            log.write(f"$ {' '.join(map(str, cmd))}\n")
            log.flush()
            r = subprocess.run(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
            log.write(r.stdout)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} exited {r.returncode}: {r.stdout[-1500:]}")
        return r

    def model(self, name: str) -> tuple[Path, Path]:
        d = self.models / name
        libs = sorted((d / "lib").glob("*.so"))
        if not libs:
            raise FileNotFoundError(f"no library in {d}/lib (bundle it with scripts/gpu/prepare.sh)")
        return d, libs[0]

    # ---- stages ---------------------------------------------------------------------------------------------------
    def env(self) -> dict:
        info = {"python": sys.version.split()[0], "machine": f"{platform.node()} {os.cpu_count()} cores"}
        if shutil.which("nvidia-smi"):
            info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        for mod in ("torch", "transformers", "tvm", "numpy"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001 - recorded, not fatal
                info[mod] = f"unavailable: {type(e).__name__}: {e}"
        import tvm

        info["tvm_cuda_device"] = bool(tvm.cuda(0).exist)
        return info

    def bandwidth(self) -> dict:
        nbytes = (64 << 20) if self.dry else (2 << 30)
        reps = 5 if self.dry else 20
        if self.dry:
            import numpy as np

            a, b = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
            np.copyto(b, a)
            t = time.perf_counter()
            for _ in range(reps):
                np.copyto(b, a)
            seconds = time.perf_counter() - t
            how = "numpy copy in host memory (dry run)"
        else:
            import torch

            a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                b.copy_(a)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
            how = "torch device-to-device copy"
        gbps = 2 * nbytes * reps / seconds / 1e9  # every byte read once and written once
        self.results["bandwidth_GBps"] = gbps
        return {"GBps_read_plus_write": gbps, "bytes": nbytes, "reps": reps, "how": how}

    def logits(self) -> dict:
        d, lib = self.model(SMOLLM if not self.dry else "tiny-q4f16_1")
        r = self.sh("logits", [sys.executable, "scripts/gpu/check_logits.py", "compare", d, lib, "--device",
                               self.device], timeout=300)
        worst = float(re.search(r"max \|dlogit\| over all steps ([\d.e+-]+)", r.stdout).group(1))
        code = ("from mlc_llm import MLCEngine\n"
                f"e = MLCEngine({str(d)!r}, model_lib={str(lib)!r}, device={'auto' if not self.dry else 'cpu'!r})\n"
                "a = e.chat.completions.create(messages=[{'role': 'user', 'content': "
                "'What is the capital of France?'}], max_tokens=24, temperature=0)\n"
                "print('DEVICE', e.device, 'SAMPLER', e.config.sampler)\n"
                "print('ANSWER', repr(a.choices[0].message.content))\ne.terminate()\n")
        chat = self.sh("logits", [sys.executable, "-c", code], timeout=300).stdout
        answer = re.search(r"ANSWER (.*)", chat).group(1)
        device, sampler = re.search(r"DEVICE (\S+) SAMPLER (\S+)", chat).groups()
        return {"max_abs_dlogit": worst, "tolerance": 2e-2, "pass": worst <= 2e-2, "auto_device": device,
                "sampler": sampler, "france_answer": answer,
                "paris": "Paris" in answer if not self.dry else "n/a (random tiny model in the dry run)"}

    def bench(self) -> dict:
        out = {}
        prompt, gen, long_prompt = (16, 16, 64) if self.dry else (128, 256, 2048)
        for q in (("q4f16_1", "q0f32") if self.dry else ("q4f16_1", "q0f16")):
            d, lib = self.model(LLAMA.format(q=q) if not self.dry else f"tiny-{q}")
            self.sh("bench", [sys.executable, "scripts/gpu/random_weights.py", d, lib, "--device", self.device],
                    timeout=600)
            res = self.out / f"bench_{q}.json"
            self.sh("bench", [sys.executable, "-m", "mlc_llm", "bench", "latency", d, "--model-lib", lib, "--device",
                              self.device, "--prompt-len", prompt, long_prompt, "--gen-len", gen, "--repeat", 3,
                              "--result-json", res], timeout=900)
            r = json.loads(res.read_text())
            decode = r["runs"][0]["decode_tok_s"]["median"]
            entry = {"weight_bytes": r["weight_bytes"], f"decode_tok_s_after_pp{prompt}": decode,
                     f"prefill_tok_s_pp{long_prompt}": r["runs"][1]["prefill_tok_s"]["median"],
                     "decode_weight_GBps": r["runs"][0].get("decode_weight_GBps")}
            bw = self.results.get("bandwidth_GBps")
            if bw:
                entry["share_of_ceiling"] = decode * r["weight_bytes"] / (bw * 1e9)
            out[q] = entry
            if not self.dry:  # 16 GB of q0f16 weights: free the disk for the next model
                for f in d.glob("params_shard_*.bin"):
                    f.unlink()
        return out

    def hf(self) -> dict:
        try:
            import torch
            import transformers
        except ImportError as e:
            return {"skipped": f"{e.name} is not installed here"}
        dev = "cpu" if self.dry else "cuda"
        prompt, gen, long_prompt = (16, 16, 64) if self.dry else (128, 256, 2048)
        d = self.model(LLAMA.format(q="q4f16_1") if not self.dry else "tiny-q4f16_1")[0]
        mc = json.loads((d / "mlc-chat-config.json").read_text())["model_config"]
        config = transformers.LlamaConfig(
            vocab_size=mc["vocab_size"], hidden_size=mc["hidden_size"], intermediate_size=mc["intermediate_size"],
            num_hidden_layers=mc["num_hidden_layers"], num_attention_heads=mc["num_attention_heads"],
            num_key_value_heads=mc["num_key_value_heads"], rope_theta=mc.get("rope_theta", 500000.0),
            max_position_embeddings=max(4096, long_prompt + gen), tie_word_embeddings=False)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float16)
        with torch.device(dev):  # random init where it runs: no 16 GB of float32 on the host first
            model = transformers.LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
        ids = torch.randint(256, mc["vocab_size"], (1, long_prompt), device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

        def timed(fn, reps=3):
            times = []
            for _ in range(reps):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t)
            return sorted(times)[len(times) // 2]

        gen_kw = dict(max_new_tokens=gen, min_new_tokens=gen, do_sample=False, cache_implementation="static",
                      pad_token_id=0)
        with torch.inference_mode():
            model(ids[:, :prompt])  # warm-up
            prefill = timed(lambda: model(ids))
            first = timed(lambda: model(ids[:, :prompt]))
            model.generate(ids[:, :prompt], **{**gen_kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
            total = timed(lambda: model.generate(ids[:, :prompt], **gen_kw))
        return {f"prefill_tok_s_pp{long_prompt}": long_prompt / prefill,
                f"decode_tok_s_after_pp{prompt}": (gen - 1) / (total - first),
                "how": f"transformers {transformers.__version__} LlamaForCausalLM fp16 on {dev}, default attention, "
                       f"generate(cache_implementation='static'), no torch.compile; decode = {gen - 1} tokens / "
                       f"(generate time - one {prompt}-token forward)"}

    def serve(self) -> dict:
        d, lib = self.model(LLAMA.format(q="q4f16_1") if not self.dry else "tiny-q4f16_1")
        if not (d / "tensor-cache.json").exists():
            self.sh("serve", [sys.executable, "scripts/gpu/random_weights.py", d, lib, "--device", self.device],
                    timeout=600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(self.out / "serve_server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "mlc_llm", "serve", str(d), "--model-lib", str(lib),
                                   "--device", self.device, "--mode", "server", "--port", str(port),
                                   "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                  start_new_session=True)
        try:
            import urllib.request

            deadline = time.time() + 300
            while True:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                        break
                except OSError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the server did not become ready; see serve_server.log")
                time.sleep(1)
            levels, in_len, out_len = ([1, 2], 32, 8) if self.dry else ([1, 8, 32, 128], 512, 128)
            res = self.out / "serve.json"
            vocab = json.loads((d / "mlc-chat-config.json").read_text())["vocab_size"]
            self.sh("serve", [sys.executable, "-m", "mlc_llm", "bench", "serve", "--base-url",
                              f"http://127.0.0.1:{port}", "--concurrency", *levels, "--input-len", in_len,
                              "--output-len", out_len, "--vocab-size", vocab, "--result-json", res], timeout=1200)
            return {"levels": json.loads(res.read_text())}
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()


def prepare_dry_models(models: Path) -> None:
    """Tiny random models compiled for the CPU, in the layout the bundle gives on the GPU machine."""
    for q in ("q4f16_1", "q0f32"):
        d = models / f"tiny-{q}"
        if (d / "lib" / "cpu.so").exists():
            continue
        mlc = [sys.executable, "-m", "mlc_llm"]
        subprocess.run([*mlc, "gen_config", "random:tiny", "--quantization", q, "--conv-template", "chatml", "-o",
                        str(d)], check=True, cwd=REPO, capture_output=True)
        subprocess.run([*mlc, "compile", str(d), "--device", "cpu", "-o", str(d / "lib" / "cpu.so")], check=True,
                       cwd=REPO, capture_output=True)
    tiny = models / "tiny-q4f16_1"
    if (tiny / "reference_logits.npz").exists():
        return
    subprocess.run([sys.executable, "scripts/gpu/random_weights.py", str(tiny), str(tiny / "lib" / "cpu.so"),
                    "--device", "cpu"], check=True, cwd=REPO, capture_output=True)
    subprocess.run([sys.executable, "scripts/gpu/check_logits.py", "record", str(tiny), "-o",
                    str(tiny / "reference_logits.npz")], check=True, cwd=REPO, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    ap.add_argument("--models", type=Path, default=os.environ.get("MLC_GPU_MODELS"),
                    help="the bundled model folders (default: $MLC_GPU_MODELS from device_setup's env.sh)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--budget-s", type=float, default=540, help="start no stage after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="on this CPU, tiny models: check the script, not the GPU")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        a.models = a.models or a.out / "dry-models"
        prepare_dry_models(a.models)
    elif a.models is None:
        ap.error("no --models and no $MLC_GPU_MODELS: run scripts/gpu/device_setup.sh and source its env.sh first")
    run = Run(a.out, a.dry_run, Path(a.models))
    for stage in a.stages:
        if time.time() - run.t0 > a.budget_s:
            run.results["stages"][stage] = {"status": "not started: over the time budget"}
            continue
        t = time.time()
        try:
            result = {"status": "ok", **getattr(run, stage)()}
        except Exception as e:  # noqa: BLE001 - every stage is tried; its error is the result
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.time() - t, 1)
        run.results["stages"][stage] = result
        run.save()
        print(f"device_run: {stage}: {result['status']} ({result['seconds']} s)", flush=True)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in run.results["stages"].items()},
                     indent=1, default=str))
    return 0 if all(v["status"] == "ok" for v in run.results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
