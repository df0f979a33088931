"""Our compiled logits against HF transformers (PyTorch) on the same GGUF: a second reference, independent of ours
and of tests/reference.py.

    python bench/check_hf_logits.py --gguf ~/.cache/mlc_llm/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --model artifacts/Qwen2.5-Coder-0.5B-Instruct-q0f32 --hf-python /tmp/hfvenv/bin/python

transformers dequantizes the GGUF to float32 at load; `--model` should be our q0f32 build of the same GGUF (the same
float32 numbers; a q4 build adds our own int4 rounding on top). For each prompt: the prompt's last-position logits
(ragged batch_prefill of all prompts) and `--decode-steps` greedy decode steps, compared with HF's full forward over
the same tokens. Prints the max |Δlogit| per prompt and whether the greedy tokens agree, then one JSON line.
`--hf-child` is the HF side (run by `--hf-python`): token-id lists on stdin (JSON), last-position logits out (.npy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n",
           "The history of the city begins in the Roman era, when a small settlement grew on the banks of the river."]


def hf_child(gguf: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    path = Path(gguf).expanduser()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    seqs = json.loads(sys.stdin.read())
    with torch.no_grad():
        rows = [model(torch.tensor([s])).logits[0, -1].double().numpy() for s in seqs]
    np.save(out, np.stack(rows))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", help="our artifact folder built from the same GGUF (q0f32 for the same numbers)")
    p.add_argument("--model-lib", help="default: MODEL/lib/cpu.so")
    p.add_argument("--hf-python", help="a Python with torch, transformers and gguf")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--hf-child", metavar="OUT_NPY", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_child:
        hf_child(a.gguf, a.hf_child)
        return 0
    if not (a.model and a.hf_python):
        p.error("--model and --hf-python are required")
    from tokenizers import Tokenizer

    from mlc_llm.serve.runner import ModelRunner

    model = Path(a.model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    seqs = [tok.encode(t, add_special_tokens=False).ids for t in PROMPTS]
    runner = ModelRunner(model, Path(a.model_lib) if a.model_lib else model / "lib" / "cpu.so")
    cache = runner.create_kv_cache(len(seqs), 1024, 256)
    ids = list(range(len(seqs)))
    for s in ids:
        runner.add_sequence(cache, s)
    ours = [np.asarray(runner.batch_prefill(cache, ids, seqs))]
    for _ in range(a.decode_steps):  # our own greedy tokens; HF is asked for the logits after the same prefixes
        nxt = [int(np.argmax(r)) for r in ours[-1]]
        for s, t in zip(seqs, nxt):
            s.append(t)
        ours.append(np.asarray(runner.batch_decode(cache, ids, nxt)))
    prefixes = [s[:len(s) - a.decode_steps + k] for k in range(a.decode_steps + 1) for s in seqs]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf.npy"
        subprocess.run([a.hf_python, __file__, "--gguf", a.gguf, "--hf-child", str(out)], check=True,
                       input=json.dumps(prefixes), text=True)
        hf = np.load(out)
    worst, agree = [], []
    for i, text in enumerate(PROMPTS):
        rows = [(ours[k][i], hf[k * len(seqs) + i]) for k in range(a.decode_steps + 1)]
        d = max(float(np.abs(o - h).max()) for o, h in rows)
        same = all(int(np.argmax(o)) == int(np.argmax(h)) for o, h in rows)
        worst.append(d)
        agree.append(same)
        print(f"prompt {i} ({len(seqs[i]) - a.decode_steps} tokens + {a.decode_steps} decoded): max |dlogit| "
              f"{d:.2e}, greedy tokens {'agree' if same else 'DIFFER'}; logit range {np.ptp(rows[0][1]):.1f}")
    print(json.dumps({"max_abs_diff": max(worst), "greedy_agree": all(agree), "per_prompt": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
