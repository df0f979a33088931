"""`snakemake build_all` through the executor profiles of profiles/: cluster-generic for real (each job its own
submission, run as a separate process), slurm and kubernetes as dry runs. Tiny random-weight deployments keep it
short."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

DEPLOYMENTS = """\
default: tiny_a
build_all: [tiny_a, tiny_b]
deployments:
  tiny_a: {model: tiny_random, quantization: q0f32, device: cpu, mode: local}
  tiny_b: {model: tiny_random, quantization: q4f32_cpu, device: cpu, mode: local}
  tiny_c: {model: tiny_random, quantization: q4f32_1, device: cpu, mode: local}
"""


def workdir(tmp_path: Path) -> Path:
    """A folder with its own configs/ (the pipeline reads ./configs first) naming the tiny deployments."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "configs" / "deployments.yaml").write_text(DEPLOYMENTS)
    return tmp_path


def snakemake(wd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(wd), *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=wd)


def needs_plugin(name: str):
    module = f"snakemake_executor_plugin_{name.replace('-', '_')}"
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"snakemake-executor-plugin-{name} not installed (pip install -e '.[cluster]')")


@needs_plugin("cluster-generic")
def test_build_all_with_jobs_as_separate_submissions(tmp_path):
    wd = workdir(tmp_path)
    one = ("--config", "build_all=tiny_a")  # one deployment: three jobs are enough to show the submissions
    r = snakemake(wd, "build_all", "--profile", str(REPO / "profiles" / "cluster-generic"), *one)
    assert r.returncode != 0 and "repeat compile_threads there" in r.stdout + r.stderr, r.stderr[-2000:]
    one += ("compile_threads=2",)  # a command-line --config replaces the profile's, compile_threads with it
    r = snakemake(wd, "build_all", "--profile", str(REPO / "profiles" / "cluster-generic"), *one)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # gen_config, convert_weight and compile went to the "batch system" (the stamp rules and the target are local
    # rules), each a process of its own, with its own log
    submitted = re.findall(r"Submitted job (\d+) with external jobid '(\d+)'", out)
    assert len(submitted) == 3 and len({pid for _, pid in submitted}) == 3, submitted
    logs = sorted(p.name for p in (wd / ".snakemake" / "cluster-logs").iterdir())
    for step in ("gen_config", "convert_weight", "compile"):
        assert sum(name.startswith(f"snakejob.{step}_tiny_random_q0f32") for name in logs) == 1, logs
    lib = wd / "artifacts" / "tiny-random-q0f32" / "lib" / "cpu.so"
    digest = (lib.parent / "cpu.so.sha256").read_text().strip()
    assert digest == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert (wd / "artifacts" / "tiny-random-q0f32" / "tensor-cache.json").is_file()
    assert not (wd / "artifacts" / "tiny-random-q4f32_cpu").exists()  # not in this build_all
    # no half-written file left anywhere (temporary names start with a dot)
    assert not [p for p in (wd / "artifacts").rglob(".*")], list((wd / "artifacts").rglob(".*"))
    again = snakemake(wd, "build_all", "--profile", str(REPO / "profiles" / "cluster-generic"), *one)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]


def test_build_all_list_from_the_command_line(tmp_path):
    wd = workdir(tmp_path)
    r = snakemake(wd, "build_all", "--cores", "2", "--dry-run", "--config", "build_all=tiny_c")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiny-random-q4f32_1" in r.stdout and "tiny-random-q0f32" not in r.stdout
    r = snakemake(wd, "build_all", "--cores", "2", "--dry-run", "--config", "build_all=tiny_a,nope")
    assert r.returncode != 0 and "build_all names unknown deployments ['nope']" in r.stdout + r.stderr


@pytest.mark.parametrize("profile", [pytest.param(p, marks=needs_plugin(p)) for p in ("slurm", "kubernetes")])
def test_cluster_profiles_dry_run(tmp_path, profile):
    wd = workdir(tmp_path)
    r = snakemake(wd, "build_all", "--profile", str(REPO / "profiles" / profile), "--dry-run", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for step in ("gen_config", "convert_weight", "compile"):
        assert f"{step}_tiny_random_q0f32" in out and f"{step}_tiny_random_q4f32_cpu" in out, out[-3000:]
