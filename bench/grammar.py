"""Cost of grammar-constrained decoding: the token-mask time per step, and decode tok/s with and without a grammar.

    .venv/bin/python bench/grammar.py artifacts/SmolLM2-135M-Instruct-q4f32_1 [--repeat 5] [--tokens 128]

1. Mask time: the tokens of a real constrained answer are replayed through fresh matchers; each step times
   `grammar.allowed_tokens` (llguidance's parallel mask computation + unpacking to a bool [batch, vocab] array) for
   batch 1 and batch 8.
2. Through the engine: the same prompt decoded for --tokens tokens (ignore_eos) without a grammar and with a JSON schema
   that cannot finish early (an array of at least 1000 short strings); decode tok/s from the engine's usage.
Medians over --repeat runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from pathlib import Path

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1000}
PROMPT = [{"role": "user", "content": "List as many fruits as you can, as a JSON array of strings."}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--model-lib", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()

    from mlc_llm import MLCEngine
    from mlc_llm.serve.grammar import allowed_tokens, response_format_grammar
    from mlc_llm.serve.protocol import ResponseFormat

    lib = a.model_lib or sorted(glob.glob(str(Path(a.model) / "lib" / "*.so")))[0]
    engine = MLCEngine(a.model, model_lib=lib, device="cpu")
    fmt = {"type": "json_schema", "json_schema": {"name": "fruits", "schema": SCHEMA}}
    vocab = engine.runner.vocab_size

    def run(grammar: bool) -> tuple[float, str]:
        r = engine.chat.completions.create(messages=PROMPT, max_tokens=a.tokens, ignore_eos=True, temperature=0,
                                           response_format=fmt if grammar else None)
        return r.usage.extra["decode_tokens_per_s"], r.choices[0].message.content

    run(False)  # warm-up
    plain = [run(False)[0] for _ in range(a.repeat)]
    constrained, text = [], ""
    for _ in range(a.repeat):
        tps, text = run(True)
        constrained.append(tps)

    grammar, _ = response_format_grammar(engine.grammars, ResponseFormat(**fmt))
    tokens = engine.tokenizer.encode(text)
    mask_ms = {}
    for batch in (1, 8):
        times = []
        for _ in range(a.repeat):
            matchers = [grammar.matcher() for _ in range(batch)]
            for t in tokens:
                start = time.perf_counter()
                allowed_tokens(matchers, vocab)
                times.append(time.perf_counter() - start)
                for m in matchers:
                    m.consume_token(t)
        mask_ms[batch] = statistics.median(times) * 1e3
    engine.terminate()
    med_plain, med_con = statistics.median(plain), statistics.median(constrained)
    print(json.dumps({
        "decode_tok_s_plain": round(med_plain, 1), "decode_tok_s_plain_runs": [round(x, 1) for x in plain],
        "decode_tok_s_grammar": round(med_con, 1), "decode_tok_s_grammar_runs": [round(x, 1) for x in constrained],
        "grammar_over_plain": round(med_con / med_plain, 3), "mask_ms_per_step_batch1": round(mask_ms[1], 3),
        "mask_ms_per_step_batch8": round(mask_ms[8], 3), "steps_replayed": len(tokens), "vocab": vocab,
        "sample_output": text[:120]}, indent=1))


if __name__ == "__main__":
    main()
