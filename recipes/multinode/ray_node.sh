#!/usr/bin/env bash
# One Ray node of a multi-node SELF-EMO run, in the foreground (`ray start --block`): the head on one machine,
# a worker on each other machine. SIGTERM or Ctrl-C stops the node with its gcs, raylet and workers.
# Usage:  bash recipes/multinode/ray_node.sh head   [extra `ray start` flags]      # on the head machine
#         RAY_ADDRESS=<head ip>:6379 bash recipes/multinode/ray_node.sh worker [flags]   # on every other machine
# then, on the head machine (OUT_DIR, DATA_DIR on a filesystem every node mounts at the same path):
#         RAY_ADDRESS=<head ip>:6379 NNODES=<N> OUT_DIR=/shared/... bash recipes/run_qwen3_8b.sh
# Every node runs `ray start` in this shell's environment: set HF_TOKEN, WANDB_API_KEY (never forwarded by the
# recipes, see selfemo_verl/ray_env.py) and per-node network settings (NCCL_SOCKET_IFNAME, ...) here.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROLE=${1:?usage: ray_node.sh head|worker [extra ray start flags]}
shift
RAY=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || echo ray )}
RAY_PORT=${RAY_PORT:-6379}                                          # the head's GCS port
NODE_IP=${NODE_IP:-$(hostname --ip-address | awk '{print $1}')}     # this node's address as the others reach it
NGPUS=${NGPUS:-}                                                    # unset: Ray counts this node's GPUs
NUM_CPUS=${NUM_CPUS:-}                                              # unset: Ray counts this node's cores
RAY_TEMP_DIR=${RAY_TEMP_DIR:-}                                      # unset: /tmp/ray

# ---------------- resources and local paths of this node ----------------
NODE=(--node-ip-address "$NODE_IP" --disable-usage-stats)
if [ -n "$NGPUS" ]; then NODE+=(--num-gpus "$NGPUS"); fi
if [ -n "$NUM_CPUS" ]; then NODE+=(--num-cpus "$NUM_CPUS"); fi
if [ -n "$RAY_TEMP_DIR" ]; then NODE+=(--temp-dir "$RAY_TEMP_DIR"); fi

case $ROLE in
  head)
    echo "ray_node.sh: head at RAY_ADDRESS=$NODE_IP:$RAY_PORT"
    exec env -u RAY_ADDRESS "$RAY" start --head --block --port "$RAY_PORT" "${NODE[@]}" "$@" ;;
  worker)
    : "${RAY_ADDRESS:?set RAY_ADDRESS=<head ip>:<port> (printed by ray_node.sh head)}"
    exec "$RAY" start --block --address "$RAY_ADDRESS" "${NODE[@]}" "$@" ;;
  *)
    echo "ray_node.sh: unknown role '$ROLE' (head | worker)" >&2
    exit 2 ;;
esac
