#!/usr/bin/env bash
# The first GPU minutes (< 1 min): SELF-GRPO and group consistency on CUDA tensors against the CPU result.
# Needs torch only (no verl, no vLLM, no network); on a machine without CUDA: one line, exit 2.
# Usage: bash recipes/gpu_check.sh [--device cuda:0]     -> OUT_DIR/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-outputs/gpu_check}

mkdir -p "$OUT_DIR"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m selfemo_verl.gpu_check --torch-only \
  --out "$OUT_DIR/gpu_check.json" "$@"
