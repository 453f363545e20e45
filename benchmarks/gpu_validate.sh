#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_validate.py says what each stage measures):
#   bash benchmarks/gpu_validate.sh            # on one GPU, <= 8 minutes, <= 8 files under $OUT
#   bash benchmarks/gpu_validate.sh --dry-run  # CPU, toy sizes: what the test suite runs
# The GPU machine has its own CUDA torch and lacks some of our packages: carry them as wheels in .whl/
# (made on a CPU machine by benchmarks/gpu_wheels.sh; name .whl in the device call's carry); they install to a
# temporary target, never over torch.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-gpu-validate-out}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
dry=0; for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
if [ "$dry" = 0 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # the dry run uses this machine's venv
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_validate.sh: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The loader's optional C extensions (region JPEG decoding, the crop resize) for this machine's Python, in place;
# a no-op where they are built and current. Without a compiler or libjpeg's headers the loader falls back.
"$PY" setup.py -q build_ext --inplace >>"$OUT/validate.log" 2>&1 \
  || echo "gpu_validate.sh: C extensions not (all) built; the loader falls back (see the decode stage)" >&2
export PATH="$(dirname "$PY"):$PATH"
# DeepSpeed builds its ops lazily; keep its cache beside the run, not in $HOME
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
LIMIT=${GPU_VALIDATE_LIMIT:-470}
exec timeout "$LIMIT" "$PY" benchmarks/gpu_validate.py --out "$OUT" "$@"
