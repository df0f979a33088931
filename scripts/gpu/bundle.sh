#!/usr/bin/env bash
# Pack what a lent GPU machine (no network, Python 3.12, PyTorch/numpy/tokenizers installed, no TVM) needs to run the
# engine on libraries cross-compiled here: a runtime-only TVM (the wheel without libtvm_compiler.so), the cp312 wheels
# of the engine's runtime dependencies, and the model folders given as arguments (weights + lib/). Everything goes
# into one tar split into parts under artifacts/gpu/ (git-ignored), each small enough for one `run` call's carry.
#
#   bash scripts/gpu/bundle.sh [MODEL_DIR ...]          # e.g. artifacts/SmolLM2-135M-Instruct-q4f16_1
#   PY_VER=3.11 bash scripts/gpu/bundle.sh ...           # the wheels for another Python (local check of the bundle)
#
# Then, on the device, one call per part (the machine stays warm ~30 s between calls):
#   run(command="bash scripts/gpu/device_setup.sh", carry=["artifacts/gpu/MANIFEST", "artifacts/gpu/part.aa"])
#   run(command="bash scripts/gpu/device_setup.sh", carry=["artifacts/gpu/MANIFEST", "artifacts/gpu/part.ab"])
# device_setup.sh keeps the parts outside the work tree and installs once all of them are there.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VER="${PY_VER:-3.12}"
PART_MB="${PART_MB:-60}"  # + the work tree (~1.5 MB) stays under the 64 MiB of one call
OUT=artifacts/gpu
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PKGS="apache-tvm-ffi ml_dtypes psutil pydantic fastapi uvicorn prometheus-client httpx llguidance jsonschema tokenizers
prompt_toolkit tqdm"
# the versions this checkout runs with (so the device runs what the tests passed on)
PINNED=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $PKGS)

for d in "$@"; do
  [ -f "$d/mlc-chat-config.json" ] || { echo "bundle: $d is not a converted model folder (no mlc-chat-config.json)" >&2; exit 2; }
  if [ ! -f "$d/tensor-cache.json" ]; then  # random-weight benchmarks: scripts/gpu/random_weights.py writes them there
    ls "$d"/lib/*.so >/dev/null 2>&1 || { echo "bundle: $d has neither weights nor a library" >&2; exit 2; }
    echo "bundle: $d has no weights: write them on the device (scripts/gpu/random_weights.py)"
  fi
done

rm -rf "$OUT"
mkdir -p "$OUT/stage/wheels" "$OUT/stage/models"
echo "bundle: wheels for Python $PY_VER: $PINNED"
.venv/bin/pip download --quiet --dest "$OUT/stage/wheels" --only-binary=:all: --python-version "$PY_VER" \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  $PINNED
echo "bundle: runtime-only TVM from $SITE/tvm"
tar -C "$SITE" -czf "$OUT/stage/tvm-runtime.tar.gz" --exclude='tvm/lib/libtvm_compiler.so' --exclude='tvm/3rdparty' \
  --exclude='__pycache__' tvm
for d in "$@"; do
  name=$(basename "$d")
  echo "bundle: model $name"
  mkdir -p "$OUT/stage/models/$name"
  cp -r "$d"/. "$OUT/stage/models/$name/"
done
tar -C "$OUT/stage" -cf "$OUT/bundle.tar" .
rm -rf "$OUT/stage"
split -b "${PART_MB}m" "$OUT/bundle.tar" "$OUT/part."
{
  echo "sha256 $(sha256sum "$OUT/bundle.tar" | cut -d' ' -f1)"
  echo "python $PY_VER"
  echo "packages $PKGS" | tr '\n' ' '; echo
  for p in "$OUT"/part.*; do echo "part $(basename "$p") $(sha256sum "$p" | cut -d' ' -f1)"; done
} > "$OUT/MANIFEST"
rm "$OUT/bundle.tar"
cat "$OUT/MANIFEST"
du -h "$OUT"/part.*
