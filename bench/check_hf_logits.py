"""Our compiled logits against HF transformers (PyTorch) on the same GGUF: a second reference, independent of ours
and of tests/reference.py.

    python bench/check_hf_logits.py --gguf ~/.cache/mlc_llm/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --model artifacts/Qwen2.5-Coder-0.5B-Instruct-q0f32 --hf-python /tmp/hfvenv/bin/python

transformers dequantizes the GGUF to float32 at load; `--model` should be our q0f32 build of the same GGUF (the same
float32 numbers; a q4 build adds our own int4 rounding on top). For each prompt: the prompt's last-position logits
(ragged batch_prefill of all prompts) and `--decode-steps` greedy decode steps, compared with HF's full forward over
the same tokens. Prints the max |Δlogit| per prompt and whether the greedy tokens agree, then one JSON line.
`--greedy N`: also up to N greedy tokens of ours (batch_decode) against HF's `generate(do_sample=False)` from each
prompt, both stopping at the model's stop tokens.
Prompts get the BOS token where the tokenizer asks for it (Gemma), as completions do.
`--hf-child` is the HF side (run by `--hf-python`): a JSON request on stdin, results out (.npy / .json).
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
    req = json.loads(sys.stdin.read())
    with torch.no_grad():
        rows = [model(torch.tensor([s])).logits[0, -1].double().numpy() for s in req["prefixes"]]
        gen = [model.generate(torch.tensor([s]), do_sample=False, max_new_tokens=req["greedy"],
                              eos_token_id=req["stop"])[0, len(s):].tolist() for s in req["prompts"]] \
            if req["greedy"] else []
    np.save(out, np.stack(rows))
    Path(out).with_suffix(".json").write_text(json.dumps(gen))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--model", help="our artifact folder built from the same GGUF (q0f32 for the same numbers)")
    p.add_argument("--model-lib", help="default: MODEL/lib/cpu.so")
    p.add_argument("--hf-python", help="a Python with torch, transformers and gguf")
    p.add_argument("--decode-steps", type=int, default=4)
    p.add_argument("--greedy", type=int, default=0, help="also compare N greedy tokens with HF's generate()")
    p.add_argument("--prompt", nargs="+", help="texts (default: a chat prompt, code, prose)")
    p.add_argument("--hf-child", metavar="OUT_NPY", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.hf_child:
        hf_child(a.gguf, a.hf_child)
        return 0
    if not (a.model and a.hf_python):
        p.error("--model and --hf-python are required")
    from mlc_llm.serve.runner import ModelRunner
    from mlc_llm.tokenizer import Tokenizer

    model = Path(a.model)
    tok = Tokenizer(model)
    texts = a.prompt or PROMPTS
    seqs = [tok.encode_prompt(t) for t in texts]
    prompts = [list(s) for s in seqs]
    chat = json.loads((model / "mlc-chat-config.json").read_text())
    stop = sorted({int(chat["eos_token_id"]), *chat["conv_template"].get("stop_token_ids", [])})
    runner = ModelRunner(model, Path(a.model_lib) if a.model_lib else model / "lib" / "cpu.so")
    chunk = json.loads((model / "mlc-chat-config.json").read_text())["prefill_chunk_size"]

    def prefill(cache, ids: list[int], prompts: list[list[int]]) -> np.ndarray:
        """In chunks of at most prefill_chunk_size tokens per sequence, as the engine runs it (windowed models)."""
        last, done = {}, [0] * len(ids)
        while any(d < len(p) for d, p in zip(done, prompts)):
            part = [(i, k) for k, i in enumerate(ids) if done[k] < len(prompts[k])]
            rows = runner.batch_prefill(cache, [i for i, _ in part],
                                        [prompts[k][done[k]:done[k] + chunk] for _, k in part])
            for (i, k), row in zip(part, np.asarray(rows)):
                done[k] = min(len(prompts[k]), done[k] + chunk)
                last[i] = row
        return np.stack([last[i] for i in ids])

    max_len = max(len(s) for s in seqs) + max(a.decode_steps, a.greedy) + 16
    cache = runner.create_kv_cache(len(seqs), max(1024, max_len), max(256, chunk * len(seqs)))
    ids = list(range(len(seqs)))
    for s in ids:
        runner.add_sequence(cache, s)
    ours = [prefill(cache, ids, seqs)]
    for _ in range(a.decode_steps):  # our own greedy tokens; HF is asked for the logits after the same prefixes
        nxt = [int(np.argmax(r)) for r in ours[-1]]
        for s, t in zip(seqs, nxt):
            s.append(t)
        ours.append(np.asarray(runner.batch_decode(cache, ids, nxt)))
    prefixes = [s[:len(s) - a.decode_steps + k] for k in range(a.decode_steps + 1) for s in seqs]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hf.npy"
        subprocess.run([a.hf_python, __file__, "--gguf", a.gguf, "--hf-child", str(out)], check=True,
                       input=json.dumps({"prefixes": prefixes, "prompts": prompts, "greedy": a.greedy, "stop": stop}),
                       text=True)
        hf = np.load(out)
        hf_gen = json.loads(out.with_suffix(".json").read_text())
    worst, agree = [], []
    for i, text in enumerate(texts):
        rows = [(ours[k][i], hf[k * len(seqs) + i]) for k in range(a.decode_steps + 1)]
        d = max(float(np.abs(o - h).max()) for o, h in rows)
        same = all(int(np.argmax(o)) == int(np.argmax(h)) for o, h in rows)
        worst.append(d)
        agree.append(same)
        print(f"prompt {i} ({len(seqs[i]) - a.decode_steps} tokens + {a.decode_steps} decoded): max |dlogit| "
              f"{d:.2e}, greedy tokens {'agree' if same else 'DIFFER'}; logit range {np.ptp(rows[0][1]):.1f}")
    result = {"max_abs_diff": max(worst), "greedy_agree": all(agree), "per_prompt": worst}
    if a.greedy:
        ours_gen = []
        for i, p in enumerate(prompts):  # one sequence at a time, fresh cache: a plain greedy continuation
            cache = runner.create_kv_cache(1, max(1024, max_len), max(256, chunk))
            runner.add_sequence(cache, 0)
            row = prefill(cache, [0], [p])[0]
            out_ids = []
            for _ in range(a.greedy):
                out_ids.append(int(np.argmax(row)))
                if out_ids[-1] in stop:  # as HF's generate() stops at the same ids
                    break
                row = np.asarray(runner.batch_decode(cache, [0], [out_ids[-1]]))[0]
            ours_gen.append(out_ids)
            same = out_ids == hf_gen[i]
            print(f"prompt {i}: {len(out_ids)} greedy tokens {'identical' if same else 'DIFFER'} to HF's generate(): "
                  f"{tok.decode(out_ids)!r}" + ("" if same else f" vs {tok.decode(hf_gen[i])!r}"))
        result["greedy_identical"] = [o == h for o, h in zip(ours_gen, hf_gen)]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
