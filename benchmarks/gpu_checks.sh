#!/usr/bin/env bash
# The GPU checks still open after the first H200 run (BENCHMARKS.md, "GPU"), in one command (≈ 4 minutes):
#   bash benchmarks/gpu_checks.sh [OUT_DIR]
# 1. batched vs per-image selection, kept sets compared (VisPruner's batched path stays opt-in until its row says
#    "identical: True"); 2. the in-LLM profile (host synchronisations per prefill, after the engine's reduction);
# 3. the batch-16 stage of the GPU benchmark, every method. Outputs under OUT_DIR (default runs/gpu-checks).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-checks}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_checks.sh: torch sees no CUDA device')"
"$py" benchmarks/select_batch_time.py --device cuda --out "$out/select_batch.json"
"$py" benchmarks/profile_gpu.py --out "$out/profile" --batch 16 --budget 64
bash benchmarks/gpu.sh "$out/bench" --batches 16 --stages "batch 16" --time-budget 150
