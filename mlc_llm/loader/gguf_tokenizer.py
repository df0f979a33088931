"""Turn GGUF tokenizer metadata (`tokenizer.ggml.*`) into a Hugging Face `tokenizer.json` + `tokenizer_config.json`."""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4
SPACE = "\u2581"  # SentencePiece's visible space

# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name (the regexes of the original HF tokenizers).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    byte_level_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level_regex])
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is not None:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("gpt-2", "gpt2", "default", ""):
        return byte_level_regex
    raise ValueError(f"GGUF pre-tokenizer '{pre}' is not supported (supported: smollm, llama-bpe, qwen2, gpt-2)")


def _score_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a token into two vocabulary tokens is a merge, ranked by the merged
    token's score (llama.cpp merges the adjacent pair whose result scores highest), ties by the pieces' ids."""
    ranked = []
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], vocab[a], vocab[b], a, b))
    ranked.sort(key=lambda r: r[:3])
    return [(a, b) for *_, a, b in ranked]


def _spm_tokenizer(meta: dict[str, Any], tokens: list[str], vocab: dict[str, int]) -> Tokenizer:
    """llama.cpp's `llama` tokenizer model (SentencePiece BPE with byte fallback: Llama 2, Mistral, Phi-3, Gemma)."""
    scores = [float(s) for s in meta.get("ggml.scores") or [0.0] * len(tokens)]
    unk = meta.get("ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_score_merges(tokens, scores, vocab), fuse_unk=True,
                               byte_fallback=True, unk_token=tokens[int(unk)] if unk is not None else None))
    prefix = bool(meta.get("ggml.add_space_prefix", True))  # SentencePiece's add_dummy_prefix
    tok.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if prefix else [])
                                          + [normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def build_tokenizer(meta: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """meta: the GGUF fields under `tokenizer.` (names without the prefix) -> (tokenizer, tokenizer_config)."""
    kind = meta.get("ggml.model")
    tokens: list[str] = list(meta["ggml.tokens"])
    types = list(meta.get("ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["ggml.merges"]]
        pre = str(meta.get("ggml.pre", "default"))
        # Llama 3's tokenizer takes a pre-token that is itself in the vocabulary as one token, whatever the merges say
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                   ignore_merges=pre in ("llama-bpe", "llama3")))
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        tok = _spm_tokenizer(meta, tokens, vocab)
    else:
        raise ValueError(f"GGUF tokenizer model '{kind}' is not supported (supported: gpt2 = byte-level BPE, "
                         "llama = SentencePiece BPE); use a Hugging Face folder with tokenizer.json instead")
    specials = [AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
                for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([a for a in specials if a.special])
    tok.add_tokens([a for a in specials if not a.special])

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("ggml.bos_token_id"),
        "eos_token": name("ggml.eos_token_id"),
        "unk_token": name("ggml.unknown_token_id"),
        "pad_token": name("ggml.padding_token_id"),
        "add_bos_token": bool(meta.get("ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("chat_template"):
        config["chat_template"] = meta["chat_template"]
    return tok, config
