#!/usr/bin/env bash
# Device side of scripts/gpu/bundle.sh. Run from the repository root with artifacts/gpu/MANIFEST and one or more
# artifacts/gpu/part.* carried. Parts are kept in $MLC_GPU_ROOT/parts (default /root/mlc-gpu, outside the work tree,
# so they survive between calls while the machine stays warm); once every part in the MANIFEST is there and its
# checksum matches, the bundle is joined and installed:
#   $MLC_GPU_ROOT/venv     a venv with the system site packages (PyTorch, numpy) + the bundled wheels + runtime TVM
#   $MLC_GPU_ROOT/models/  the bundled model folders
#   $MLC_GPU_ROOT/env.sh   `source` it: activates the venv, PYTHONPATH=<repo>, TVM_USE_RUNTIME_LIB=1
# Exit status 0 with "installed" when ready, 0 with "waiting for ..." when parts are missing, 1 on a bad part.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
ROOT="${MLC_GPU_ROOT:-/root/mlc-gpu}"
PY="${PYTHON:-python3}"
MANIFEST="$REPO/artifacts/gpu/MANIFEST"
[ -f "$MANIFEST" ] || { echo "device_setup: no artifacts/gpu/MANIFEST (carry it with the parts)" >&2; exit 1; }
mkdir -p "$ROOT/parts"

if [ -f "$ROOT/installed" ] && cmp -s "$MANIFEST" "$ROOT/installed"; then
  echo "device_setup: installed (already) in $ROOT"; exit 0
fi
for p in "$REPO"/artifacts/gpu/part.*; do
  [ -e "$p" ] || continue
  cp "$p" "$ROOT/parts/"
done
missing=()
while read -r kind name sum; do
  [ "$kind" = part ] || continue
  if [ ! -f "$ROOT/parts/$name" ]; then missing+=("$name"); continue; fi
  if [ "$(sha256sum "$ROOT/parts/$name" | cut -d' ' -f1)" != "$sum" ]; then
    echo "device_setup: $name does not match the MANIFEST (from another bundle?)" >&2; rm -f "$ROOT/parts/$name"; exit 1
  fi
done < "$MANIFEST"
if [ ${#missing[@]} -gt 0 ]; then echo "device_setup: waiting for ${missing[*]}"; exit 0; fi

want_py=$(awk '$1=="python"{print $2}' "$MANIFEST")
have_py=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$want_py" = "$have_py" ] || { echo "device_setup: bundle is for Python $want_py, $PY is $have_py" >&2; exit 1; }

rm -rf "$ROOT/stage" "$ROOT/venv" "$ROOT/models"
mkdir -p "$ROOT/stage"
cat $(awk '$1=="part"{print "'"$ROOT"'/parts/"$2}' "$MANIFEST") | tar -C "$ROOT/stage" -xf -
"$PY" -m venv --system-site-packages "$ROOT/venv"
# the bundled versions, also where the system site packages have others (tokenizers, numpy stay the system's if new
# enough for the wheels' requirements)
"$ROOT/venv/bin/python" -m pip install --quiet --no-index --find-links "$ROOT/stage/wheels" --ignore-installed \
  $(awk '$1=="packages"{$1=""; print}' "$MANIFEST")
SITE=$("$ROOT/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
tar -C "$SITE" -xzf "$ROOT/stage/tvm-runtime.tar.gz"
mv "$ROOT/stage/models" "$ROOT/models"
rm -rf "$ROOT/stage"
cat > "$ROOT/env.sh" <<ENV
source "$ROOT/venv/bin/activate"
export PYTHONPATH="$REPO\${PYTHONPATH:+:\$PYTHONPATH}"
export TVM_USE_RUNTIME_LIB=1
export MLC_GPU_MODELS="$ROOT/models"
ENV
TVM_USE_RUNTIME_LIB=1 "$ROOT/venv/bin/python" -c "import tvm, tvm_ffi; from tvm.runtime.vm import VirtualMachine; \
print('device_setup: tvm', tvm.__version__, 'runtime-only; cuda device present:', tvm.cuda(0).exist)"
cp "$MANIFEST" "$ROOT/installed"
echo "device_setup: installed in $ROOT (source $ROOT/env.sh); models: $(ls "$ROOT/models" | tr '\n' ' ')"
