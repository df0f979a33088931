"""Compose a deployment: configs/deployments.yaml names group choices (+ overrides); Hydra composes the groups;
the schemas validate. Every failure becomes one ConfigError line naming the key and what is allowed."""
from __future__ import annotations

import dataclasses
import os
import re
from enum import Enum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schema import BuildConfig

GROUPS = ("model", "quantization", "conv_template", "device", "mode")


class ConfigError(Exception):
    pass


def default_config_dir() -> Path:
    """$MLC_CONFIG_DIR, else ./configs, else the repository's configs/ beside the package."""
    if os.environ.get("MLC_CONFIG_DIR"):
        return Path(os.environ["MLC_CONFIG_DIR"]).resolve()
    if (Path.cwd() / "configs" / "deployments.yaml").exists():
        return (Path.cwd() / "configs").resolve()
    return (Path(__file__).resolve().parents[2] / "configs")


def load_deployments(config_dir: Path | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    path = (config_dir or default_config_dir()) / "deployments.yaml"
    if not path.exists():
        raise ConfigError(f"no deployments file at {path}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    deployments = data.get("deployments") or {}
    unknown_keys = {k for d in deployments.values() for k in d} - {*GROUPS, "overrides"}
    if unknown_keys:
        raise ConfigError(f"{path.name}: unknown deployment keys {sorted(unknown_keys)} "
                          f"(allowed: {', '.join(GROUPS)}, overrides)")
    default = data.get("default")
    if default not in deployments:
        raise ConfigError(f"{path.name}: default deployment '{default}' is not defined")
    return default, deployments


def build_all_names(config_dir: Path | None = None) -> list[str]:
    """The deployments `snakemake build_all` builds: deployments.yaml's `build_all` list, else all of them."""
    path = (config_dir or default_config_dir()) / "deployments.yaml"
    _, deployments = load_deployments(config_dir)
    names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("build_all")
    return list(deployments) if names is None else check_build_all(names, deployments, path.name)


def check_build_all(names: Any, deployments, where: str) -> list[str]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{where}: build_all must be a non-empty list of deployment names")
    unknown = [n for n in names if n not in deployments]
    if unknown:
        raise ConfigError(f"{where}: build_all names unknown deployments {unknown} (allowed: {', '.join(deployments)})")
    return list(dict.fromkeys(names))


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _merge_overrides(base: list[str], user: list[str]) -> list[str]:
    """User overrides win over the deployment's for the same key (Hydra refuses a key given twice)."""
    for o in user:
        if "=" not in o:
            raise ConfigError(f"bad override '{o}': expected key=value (e.g. quantization=q0f32, "
                              f"model.context_window_size=4096)")
    user_keys = {_key(o) for o in user}
    return [o for o in base if _key(o) not in user_keys] + list(user)


def _explain(e: BaseException) -> str:
    cause = e.__cause__ or e
    text = " ".join(str(getattr(cause, "msg", cause)).split())
    missing = re.search(r"Could not find '(\w+)/([^']+)' Available options in '\w+': (.*?) Config search path", text)
    if missing:
        group, choice, options = missing.groups()
        return f"unknown {group} '{choice}' (allowed: {', '.join(options.split())})"
    key = getattr(cause, "full_key", None) or ""
    if key and "not in struct" in text:
        return f"unknown key '{key}' (allowed: {_allowed_for(BuildConfig, key)})"
    return f"{key}: {text}" if key else text


def _allowed_for(schema, key: str) -> str:
    cls = schema
    for part in key.split(".")[:-1]:
        cls = {f.name: f for f in dataclasses.fields(cls)}[part].default_factory
    return ", ".join(f.name for f in dataclasses.fields(cls))


def compose_deployment(name: str | None = None, overrides: list[str] | None = None,
                       config_dir: Path | None = None) -> BuildConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = (config_dir or default_config_dir()).resolve()
    default, deployments = load_deployments(config_dir)
    name = name or default
    if name not in deployments:
        raise ConfigError(f"unknown deployment '{name}' (allowed: {', '.join(deployments)})")
    d = deployments[name]
    base = [f"{g}={d[g]}" for g in GROUPS if g in d] + list(d.get("overrides") or [])
    all_overrides = _merge_overrides(base, list(overrides or []))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name="config", overrides=all_overrides)
    except Exception as e:  # Hydra wraps the detail; surface it in one line
        raise ConfigError(f"deployment '{name}': {_explain(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    schema = OmegaConf.structured(BuildConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged).check()
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        text = str(getattr(e, "msg", e)).splitlines()[0]
        if "not in" in text and key:
            raise ConfigError(f"deployment '{name}': unknown key '{key}' "
                              f"(allowed: {_allowed_for(BuildConfig, key)})") from None
        raise ConfigError(f"deployment '{name}': {key + ': ' if key else ''}{text}") from None
    except ValueError as e:
        raise ConfigError(f"deployment '{name}': {e}") from None


def as_plain(cfg: BuildConfig) -> dict[str, Any]:
    def conv(v):
        if isinstance(v, Enum):
            return v.value
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return v

    return conv(cfg)
