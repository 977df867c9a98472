#!/usr/bin/env bash
# The GPU benchmark of issue 26 in one command (≈ 8 minutes on one H100/H200):
#   bash benchmarks/gpu.sh [OUT_DIR] [extra gpu_bench.py options]
# Writes OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md (default OUT_DIR: runs/gpu). FlashAttention-2 is
# benchmarked too when `flash_attn` already imports (no install is attempted: the machine may be offline).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu}"
shift || true
"${PYTHON:-python3}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" benchmarks/gpu_bench.py --out "$out" --time-budget 450 "$@"
