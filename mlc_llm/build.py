"""`mlc_llm build <deployment> [overrides]`: run the deployment's Snakemake target through Snakemake's Python API."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import ConfigError, load_deployments
from .loader import SourceError, resolve_source


def repo_root() -> Path:
    """The checkout holding Snakefile and pipelines/ (the package is installed editable from it)."""
    return Path(__file__).resolve().parents[1]


def list_deployments() -> None:
    default, deployments = load_deployments()
    for name, d in deployments.items():
        mark = " (default)" if name == default else ""
        print(f"{name}{mark}: " + ", ".join(f"{k}={v}" for k, v in d.items() if k != "overrides"))


def build(deployment: str | None, overrides: list[str], cores: int = 2, dry_run: bool = False,
          force: bool = False, workdir: Path | None = None) -> int:
    from .config import compose_deployment

    default, _ = load_deployments()
    name = deployment or default
    cfg = compose_deployment(name, overrides)  # clear config errors before Snakemake starts
    try:
        resolve_source(cfg.model.source, cfg.model.install_hint)
    except SourceError as e:
        raise ConfigError(f"deployment '{name}': {e}") from None
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, ExecutionSettings, OutputSettings,
                                          ResourceSettings)

    logging.getLogger("snakemake").propagate = False
    root = repo_root()
    os.environ["PYTHONPATH"] = str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    with SnakemakeApi(OutputSettings(dryrun=dry_run, printshellcmds=True)) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=cores),
            config_settings=ConfigSettings(config={"deployment": name, "overrides": list(overrides)}),
            snakefile=root / "Snakefile", workdir=(workdir or root).resolve())
        dag = workflow.dag(DAGSettings(targets={f"build_{name}"}, forceall=force, force_incomplete=True))
        dag.execute_workflow(executor="dryrun" if dry_run else "local",
                             execution_settings=ExecutionSettings(keep_going=False))
    if not dry_run:
        where = (workdir or root).resolve()
        print(f"built deployment '{name}': {where / cfg.model_dir} and {where / cfg.model_lib}")
    return 0
