"""Resolve a model source string to a readable source, with clear messages for what is missing.

Forms: `pypkg:<package>/<file>` (a file shipped in a Python package, found without importing it),
`models:<file>` (a model fetched by scripts/fetch_models.sh into $MLC_LLM_MODELS_DIR, default ~/.cache/mlc_llm/models),
`HF://<org>/<repo>` (only from the local Hugging Face cache: nothing is downloaded), `random:<preset>`,
or a local path to a `.gguf` file or a Hugging Face folder.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .base import Source


class SourceError(Exception):
    """A model source that cannot be found or read; the message says what to put where."""


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def _resolve_hf(repo: str) -> Path:
    if repo.count("/") != 1:
        raise SourceError(f"bad HF source 'HF://{repo}': expected HF://<org>/<repo>")
    org, name = repo.split("/")
    searched = []
    for cache in _hf_cache_dirs():
        snapshots = cache / f"models--{org}--{name}" / "snapshots"
        searched.append(str(snapshots))
        if snapshots.is_dir():
            found = sorted((p for p in snapshots.iterdir() if (p / "config.json").exists()),
                           key=lambda p: p.stat().st_mtime, reverse=True)
            if found:
                return found[0]
    raise SourceError(
        f"model HF://{repo} is not in the local Hugging Face cache and cannot be downloaded here (no hub access). "
        f"Put a snapshot (config.json, *.safetensors, tokenizer files) under {searched[-1]}/<revision>/ "
        f"(or set HF_HUB_CACHE / HF_HOME), or point model.source at a local folder with those files"
    )


def _resolve_pypkg(spec: str, install_hint: str = "") -> Path:
    pkg, _, rel = spec.partition("/")
    found = importlib.util.find_spec(pkg)  # locates the package without importing (running) it
    if found is None or not found.submodule_search_locations:
        hint = f": {install_hint}" if install_hint else ""
        raise SourceError(f"Python package '{pkg}' that ships the model is not installed{hint}")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise SourceError(f"package '{pkg}' is installed but has no file '{rel}' (looked at {path})")
    return path


def models_dir() -> Path:
    return Path(os.environ.get("MLC_LLM_MODELS_DIR") or Path.home() / ".cache" / "mlc_llm" / "models").expanduser()


def _resolve_fetched(name: str, install_hint: str = "") -> Path:
    path = models_dir() / name
    if not path.exists():
        hint = install_hint or "scripts/fetch_models.sh --list shows the models it can fetch"
        raise SourceError(f"model file '{name}' is not in {models_dir()} (set MLC_LLM_MODELS_DIR to look elsewhere); "
                          f"fetch it first: {hint}")
    return path


def resolve_source(source: str, install_hint: str = "") -> tuple[str, str]:
    """Return (kind, location): kind in gguf | hf | random; location is a path or preset name."""
    if source.startswith("random:"):
        return "random", source.split(":", 1)[1]
    if source.startswith("pypkg:"):
        path = _resolve_pypkg(source.split(":", 1)[1], install_hint)
    elif source.startswith("models:"):
        path = _resolve_fetched(source.split(":", 1)[1], install_hint)
    elif source.startswith(("HF://", "hf://")):
        path = _resolve_hf(source[5:])
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SourceError(f"model source '{source}' does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"model file '{path}' is not a .gguf file (give a GGUF file or a Hugging Face folder)")
        return "gguf", str(path.resolve())
    if not (path / "config.json").exists():
        raise SourceError(f"model folder '{path}' has no config.json (expected a Hugging Face model folder)")
    return "hf", str(path.resolve())


def open_source(source: str, install_hint: str = "") -> Source:
    kind, location = resolve_source(source, install_hint)
    if kind == "gguf":
        from .gguf_loader import GGUFSource

        return GGUFSource(location)
    if kind == "hf":
        from .hf_loader import HFSource

        return HFSource(location)
    from .random_loader import RandomSource

    return RandomSource(location)
