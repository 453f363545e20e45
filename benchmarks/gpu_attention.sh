#!/usr/bin/env bash
# Attention kernels on one CUDA GPU, bf16: time, peak memory and achieved TFLOP/s against a bf16 matmul
# peak measured in the same run, ratios to the `math` reference. Fits one device call (< 7 minutes):
#   part 1 (<= 120 s): math, SDPA (auto and each forced kernel), flash-attn if importable
#   part 2 (<= 150 s): FlexAttention dense and block-sparse (each N compiles its own Triton kernels)
#   part 3 (<= 120 s): the block-sparse study's fwd+bwd time and memory per mask (sparse_attention.py)
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

# part 3 (<= 120 s): the sparse-attention study's cost columns for ViT-Tiny/8 at 96 px (fp32, batch 64;
# accuracy comes from the CPU training runs, docs/models.md)
timeout 120 "$PY" benchmarks/sparse_attention.py --timing-only --device cuda --timing-batch 64 --repeats 10 \
  --out "$OUT_DIR/sparse_study" | tee "$OUT_DIR/gpu_sparse_study.txt"
rc3=${PIPESTATUS[0]}

echo "part 1 rc=$rc1, part 2 rc=$rc2, part 3 rc=$rc3 (124 = timed out; rows printed before that are still valid)"
[ "$rc1" -eq 0 ]
