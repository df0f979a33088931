"""Logits of a compiled library against a float64 numpy reference recorded beforehand (the CUDA correctness check).

    # here (CPU machine, build side installed): the reference, from the numpy Llama of tests/reference.py on the
    # same dequantized weights; 4 prompts, 4 greedy steps (the greedy path of the reference itself)
    .venv/bin/python scripts/gpu/check_logits.py record MODEL_DIR -o MODEL_DIR/reference_logits.npz
    # anywhere, runtime-only is enough (e.g. the lent GPU after scripts/gpu/device_setup.sh):
    python scripts/gpu/check_logits.py compare MODEL_DIR LIB --device cuda [--tol 2e-2]

`compare` runs batch_prefill of the 4 prompts, then batch_decode over the reference's recorded tokens (teacher
forcing, so one early argmax flip cannot derail the comparison), prints the max |Δlogit| per step and whether the
top-1 tokens agree, then the greedy chat answer to "What is the capital of France?". Exit status 1 above the tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TEXTS = ["The capital of France is", "def fibonacci(n):\n    return", "Once upon a time, in a land far away, there "
         "lived a", "1 2 3 4"]
STEPS = 4


def record(model_dir: Path, out: Path) -> None:
    from tokenizers import Tokenizer

    from mlc_llm import tensor_cache
    from tests.reference import NumpyLlama

    chat = json.loads((model_dir / "mlc-chat-config.json").read_text())
    ref = NumpyLlama(tensor_cache.load_numpy(model_dir), chat["model_config"])
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in TEXTS]
    seqs, logits = [list(p) for p in prompts], []
    for _ in range(STEPS + 1):
        step = np.stack([ref.logits(s)[-1] for s in seqs]).astype(np.float32)
        logits.append(step)
        for s, row in zip(seqs, step):
            s.append(int(np.argmax(row)))
    np.savez_compressed(out, logits=np.stack(logits), prompt_lens=[len(p) for p in prompts],
                        tokens=np.array(seqs, dtype=object), quantization=chat["quantization"])
    print(f"recorded {len(prompts)} prompts x {STEPS + 1} steps of logits -> {out}")


def compare(model_dir: Path, lib: str, device: str, ref_path: Path, tol: float) -> int:
    from mlc_llm import MLCEngine
    from mlc_llm.serve.runner import ModelRunner

    ref = np.load(ref_path, allow_pickle=True)
    expected, lens, seqs = ref["logits"], [int(n) for n in ref["prompt_lens"]], [list(s) for s in ref["tokens"]]
    runner = ModelRunner(model_dir, lib, device)
    cache = runner.create_kv_cache(len(seqs), 1024, 256)
    ids = list(range(len(seqs)))
    for i in ids:
        runner.add_sequence(cache, i)
    got = runner.batch_prefill(cache, ids, [s[:n] for s, n in zip(seqs, lens)])
    worst = 0.0
    for step in range(len(expected)):
        diff = float(np.abs(got - expected[step]).max())
        same = [int(np.argmax(g)) == int(np.argmax(e)) for g, e in zip(got, expected[step])]
        print(f"step {step}: max |dlogit| {diff:.3e}, top-1 agrees {sum(same)}/{len(same)}")
        worst = max(worst, diff)
        if step + 1 < len(expected):
            got = runner.batch_decode(cache, ids, [s[n + step] for s, n in zip(seqs, lens)])
    engine = MLCEngine(str(model_dir), model_lib=lib, device=device)
    answer = engine.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0)
    engine.terminate()
    print(f"greedy answer: {answer.choices[0].message.content!r}")
    print(f"max |dlogit| over all steps {worst:.3e} (tolerance {tol:g}): {'PASS' if worst <= tol else 'FAIL'}")
    return 0 if worst <= tol else 1


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("model_dir", type=Path)
    r.add_argument("-o", "--output", type=Path, required=True)
    c = sub.add_parser("compare")
    c.add_argument("model_dir", type=Path)
    c.add_argument("lib")
    c.add_argument("--device", default="cuda")
    c.add_argument("--ref", type=Path, help="default: MODEL_DIR/reference_logits.npz")
    c.add_argument("--tol", type=float, default=2e-2)
    a = ap.parse_args()
    if a.cmd == "record":
        record(a.model_dir, a.output)
        return 0
    return compare(a.model_dir, a.lib, a.device, a.ref or a.model_dir / "reference_logits.npz", a.tol)


if __name__ == "__main__":
    sys.exit(main())
