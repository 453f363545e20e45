#!/usr/bin/env bash
# Attention kernels on one CUDA GPU, bf16: time, peak memory and achieved TFLOP/s against a bf16 matmul
# peak measured in the same run, ratios to the `math` reference. Fits one device call (< 5 minutes):
#   part 1 (<= 120 s): math, SDPA (auto and each forced kernel), flash-attn if importable
#   part 2 (<= 150 s): FlexAttention dense and block-sparse (each N compiles its own Triton kernels)
# Needs a CUDA build of torch and this repo on PYTHONPATH (no install, no network).
# Usage: bash benchmarks/gpu_attention.sh [OUT_DIR]     (default: $OUT, else bench-out/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench-out}}
mkdir -p "$OUT_DIR"

PY=${PYTHON:-}
for cand in "$PY" .venv/bin/python python3 python; do
  [ -n "$cand" ] || continue
  if "$cand" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=$cand; break
  fi
  PY=
done
if [ -z "$PY" ]; then
  echo "gpu_attention.sh: no python with a CUDA-enabled torch found (set PYTHON=...)" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee "$OUT_DIR/gpu_env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT_DIR/gpu_env.txt" 2>&1 || true

COMMON=(--device cuda --dtype bf16 --batch 8 --heads 12 --head-dim 64 --repeats 10)

timeout 120 "$PY" benchmarks/attention.py "${COMMON[@]}" --matmul-peak \
  --backends sdpa sdpa_flash sdpa_efficient sdpa_cudnn flash_attn | tee "$OUT_DIR/gpu_attention_kernels.txt"
rc1=${PIPESTATUS[0]}

timeout 150 "$PY" benchmarks/attention.py "${COMMON[@]}" --matmul-peak \
  --backends flex flex_block_sparse_0.25 | tee "$OUT_DIR/gpu_attention_flex.txt"
rc2=${PIPESTATUS[0]}

echo "part 1 rc=$rc1, part 2 rc=$rc2 (124 = timed out; rows printed before that are still valid)"
[ "$rc1" -eq 0 ]
