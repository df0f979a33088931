"""GGUF tokenizers (byte-level BPE and SentencePiece BPE) against llama.cpp's own test vectors: vocab-only GGUFs with
inputs and the token ids llama.cpp produces (`scripts/fetch_models.sh ggml_vocab`; skipped when absent)."""
from __future__ import annotations

import gguf
import pytest

from mlc_llm.loader.locate import models_dir

VOCABS = {"llama-spm": "Llama 2 SentencePiece", "phi-3": "Phi-3 SentencePiece", "llama-bpe": "Llama 3 BPE",
          "qwen2": "Qwen2 BPE"}


def _cases(name: str):
    d = models_dir() / "ggml-vocab"
    gguf_path = d / f"ggml-vocab-{name}.gguf"
    if not gguf_path.exists():
        pytest.skip(f"{gguf_path} is absent: `bash scripts/fetch_models.sh ggml_vocab` fetches llama.cpp's vectors")
    texts = (d / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (d / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    return gguf_path, list(zip(texts, ([int(t) for t in line.split()] for line in ids)))


@pytest.mark.parametrize("name", list(VOCABS))
def test_gguf_tokenizer_matches_llama_cpp(name, tmp_path):
    from mlc_llm.loader.gguf_loader import GGUFSource
    from mlc_llm.loader.gguf_tokenizer import build_tokenizer

    path, cases = _cases(name)
    assert len(cases) > 40
    reader = gguf.GGUFReader(str(path))  # a vocab-only file: its tokenizer metadata, no weights
    meta = {k[len("tokenizer."):]: GGUFSource._field(f) for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok, _ = build_tokenizer(meta)
    wrong = [(text, want, tok.encode(text, add_special_tokens=False).ids) for text, want in cases
             if tok.encode(text, add_special_tokens=False).ids != want]
    assert not wrong, f"{VOCABS[name]}: {len(wrong)} of {len(cases)} differ, first: {wrong[0]}"
    for text, want in cases:  # and back
        assert tok.decode(want, skip_special_tokens=False) == text, (name, text)


def test_sentencepiece_gguf_round_trip_and_special_tokens():
    from mlc_llm.loader.gguf_tokenizer import build_tokenizer

    path, _ = _cases("llama-spm")
    reader = gguf.GGUFReader(str(path))
    meta = {k[len("tokenizer."):]: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok, config = build_tokenizer(meta)
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>" and config["add_bos_token"] is True
    ids = tok.encode("<s>[INST] Hi [/INST]", add_special_tokens=False).ids
    assert ids[0] == 1  # the control token is one special token, not text
    assert tok.encode("\n\n", add_special_tokens=False).ids == [29871, 13, 13]  # byte fallback <0x0A>
