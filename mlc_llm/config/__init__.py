"""Deployment configs: Hydra composition of configs/ groups, validated by dataclass schemas."""
from .compose import ConfigError, compose_deployment, load_deployments
from .schema import BuildConfig

__all__ = ["BuildConfig", "ConfigError", "compose_deployment", "load_deployments"]
