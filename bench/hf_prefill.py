"""HF transformers (PyTorch) prefill tok/s on the same GGUF, for the side-by-side in bench/compare_llamacpp.py.

Runs in any Python that has torch, transformers and gguf (not the project's venv, which has no torch):

    python bench/hf_prefill.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --dtype bfloat16 \
        --prompt-len 128 512 --repeat 5

transformers dequantizes the GGUF's int4 weights to `--dtype` at load, so this is PyTorch running the same numbers in
bf16 / fp32 (what "HF transformers prefills this model at ..." means). Prefill = one forward over a random token-id
prompt with a fresh KV cache, logits of the last position only (as our engine and llama.cpp compute them). Prints
one JSON object: {"pp128": {"median", "min", "max", "samples"}, ...} on the last line.

`--serve`: for bench/prefill_vs_hf.py, which interleaves single prefills of both sides: after loading, prints
"ready", then for each line N read from stdin runs one prefill of N tokens (the same ids for the same N) and prints
its seconds; stops at end of input.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--serve", action="store_true", help="one prefill per line N on stdin (see the docstring)")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    path = Path(a.gguf).resolve()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 torch_dtype=getattr(torch, a.dtype))
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prefill(ids) -> float:
        """Seconds of one forward with a fresh cache, last position's logits only."""
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits
        float(logits[0, -1, 0])  # the result is really there
        return time.perf_counter() - t0

    out = {}
    if a.serve:
        prompts: dict[int, "torch.Tensor"] = {}
        print("ready", flush=True)
        with torch.inference_mode():
            for line in sys.stdin:
                n = int(line)
                if n not in prompts:
                    prompts[n] = torch.randint(0, vocab, (1, n), generator=gen)
                print(prefill(prompts[n]), flush=True)
        return 0
    with torch.inference_mode():
        for n in a.prompt_len:
            ids = torch.randint(0, vocab, (1, n), generator=gen)
            samples = [n / prefill(ids) for _ in range(a.warmup + a.repeat)][a.warmup:]
            out[f"pp{n}"] = {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                             "samples": samples}
            print(f"pp{n}: {out[f'pp{n}']['median']:.1f} tok/s [{min(samples):.1f}-{max(samples):.1f}]", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
