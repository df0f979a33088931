#!/usr/bin/env bash
# Everything the lent GPU machine needs, built here (the CPU machine, with the TVM compiler), then bundled:
#   - SmolLM2-135M-Instruct q4f16_1: weights, the CUDA library (through the pipeline) and the float64 numpy reference
#     logits for scripts/gpu/check_logits.py
#   - Llama-3-8B shapes, q4f16_1 and q0f16: config + CUDA library only; scripts/gpu/random_weights.py writes their
#     weights on the device (4.5 GB and 16 GB cannot travel)
#   - the runtime-only TVM and the engine's wheels (scripts/gpu/bundle.sh), split into parts under artifacts/gpu/
#
#   bash scripts/gpu/prepare.sh
#
# Then, on the device, one call per part; the call that brings the last part installs and runs every check
# (scripts/gpu/device_run.py; results in $OUT/results.json):
#   run(command="bash scripts/gpu/device_setup.sh", carry=["artifacts/gpu/MANIFEST", "artifacts/gpu/part.aa"])
#   ... one such call per further part but the last ...
#   run(command="bash scripts/gpu/device_setup.sh && source /root/mlc-gpu/env.sh && python scripts/gpu/device_run.py",
#       carry=["artifacts/gpu/MANIFEST", "artifacts/gpu/part.<last>"], timeout_s=560)
# The machine stays warm ~30 s between calls: make them back to back.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
SMOL=artifacts/SmolLM2-135M-Instruct-q4f16_1

.venv/bin/snakemake build_smollm2_cuda --cores "${CORES:-2}"
[ -f "$SMOL/reference_logits.npz" ] || $PY scripts/gpu/check_logits.py record "$SMOL" -o "$SMOL/reference_logits.npz"

models=("$SMOL")
for q in q4f16_1 q0f16; do
  d=artifacts/gpu-models/Llama-3-8B-random-$q
  $PY -m mlc_llm gen_config random:llama3_8b --quantization "$q" --conv-template llama-3 -o "$d"
  $PY -m mlc_llm compile "$d" --device cuda -o "$d/lib/cuda.so"
  models+=("$d")
done
bash scripts/gpu/bundle.sh "${models[@]}"
echo "prepare: $(ls artifacts/gpu/part.* | wc -l) parts in artifacts/gpu; see this file's header for the device calls"
