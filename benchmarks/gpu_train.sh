#!/usr/bin/env bash
# ViT-B/16 bf16 training throughput and MFU on one GPU (fits one device call of < 8 minutes):
#   bash benchmarks/gpu_train.sh            # from the repo root, with .venv holding a CUDA torch
# Prints the GPU, then JSON lines (last line = the 224 px run): images/s, step ms, TFLOP/s, MFU, ours vs bare.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 "$PY" benchmarks/gpu_train.py --model vit_base_patch16 --img 224 --batch 256 --steps 40 --attention auto "$@"
