#!/usr/bin/env bash
# SELF-EMO | Qwen3-8B | Megatron actor/ref (model_engine=megatron, mbridge) + vLLM rollout | 1 node x 8 GPUs |
# ROUNDS self-evolution rounds, then eval.
# Usage: bash recipes/run_qwen3_8b_megatron.sh [extra Hydra overrides, applied to every round]
#        DRY_RUN=1 bash recipes/run_qwen3_8b_megatron.sh   # compose + validate every round's config on CPU
# Rounds, flywheel and evaluation: recipes/_rounds.sh. Hyper-parameters and needs: recipes/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron-LM's requirement for overlapping TP communication

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-8B}
NGPUS=${NGPUS:-8}
NNODES=${NNODES:-1}
ACTOR_TP=${ACTOR_TP:-2}
ACTOR_PP=${ACTOR_PP:-2}
ROLLOUT_TP=${ROLLOUT_TP:-2}
PPO_MAX_TOKEN_LEN=${PPO_MAX_TOKEN_LEN:-24576}
EXPERIMENT=${EXPERIMENT:-qwen3_8b_megatron}
source recipes/_rounds.sh

# ---------------- backend: Megatron-Core actor/ref (HF checkpoints through mbridge), vLLM rollout ----------------
BACKEND=(
  model_engine=megatron
  actor_rollout_ref.actor.megatron.tensor_model_parallel_size="$ACTOR_TP"
  actor_rollout_ref.actor.megatron.pipeline_model_parallel_size="$ACTOR_PP"
  actor_rollout_ref.ref.megatron.tensor_model_parallel_size="$ACTOR_TP"
  actor_rollout_ref.ref.megatron.pipeline_model_parallel_size="$ACTOR_PP"
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
)
HF_SUBDIR=actor/model/huggingface   # Megatron + mbridge (use_dist_checkpointing=False) saves the model as HF here

selfemo_rounds "$@"
