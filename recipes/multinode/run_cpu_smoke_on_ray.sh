#!/usr/bin/env bash
# The CPU smoke (recipes/run_cpu_smoke.sh: the real verl trainer, tiny model, 2 steps) on a Ray cluster started
# beforehand (RAY_ADDRESS), one trainer process per node (trainer.nnodes=NNODES x 1 logical GPU; start each node
# with --num-gpus 1 and at least 8 logical CPUs, see recipes/README.md "Cluster").
# Checks that every node sees OUT_DIR (selfemo_verl.ray_env check-shared), then forwards the run's variables to the
# workers through Ray's runtime env; metrics.jsonl, weight_sync.jsonl and the checkpoints land under OUT_DIR.
# Usage: RAY_ADDRESS=<head ip>:6379 NNODES=2 bash recipes/multinode/run_cpu_smoke_on_ray.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${RAY_ADDRESS:?set RAY_ADDRESS=<head ip>:<port> of a running Ray cluster (recipes/multinode/ray_node.sh)}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
NNODES=${NNODES:-2}
OUT_DIR=$(realpath -m "${OUT_DIR:-outputs/cpu_smoke_ray}")
mkdir -p "$OUT_DIR"

# ---------------- what run_cpu_smoke.sh exports for itself, exported here too, to be forwarded ----------------
eval "$($PYTHON -m selfemo_verl.cpu.launch env)"
export VERL_FILE_LOGGER_PATH=$OUT_DIR/metrics.jsonl SELFEMO_HF_SYNC_LOG=$OUT_DIR/weight_sync.jsonl
$PYTHON -m selfemo_verl.ray_env check-shared --nodes "$NNODES" "$OUT_DIR"
RAY_ENV_LINES=$($PYTHON -m selfemo_verl.ray_env overrides)   # exit 2: a value Hydra cannot carry
mapfile -t RAY_ENV <<< "$RAY_ENV_LINES"

# ---------------- Ray: join the cluster (ray.init then refuses num_cpus / num_gpus), one trainer per node ----------
CLUSTER=(
  ray_kwargs.ray_init.num_cpus=null
  ray_kwargs.ray_init.num_gpus=null
  trainer.nnodes="$NNODES"
  trainer.n_gpus_per_node=1
)

OUT_DIR=$OUT_DIR exec bash recipes/run_cpu_smoke.sh "${CLUSTER[@]}" "${RAY_ENV[@]}" "$@"
