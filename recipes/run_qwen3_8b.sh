#!/usr/bin/env bash
# SELF-EMO | Qwen3-8B | FSDP actor/ref + vLLM rollout | 1 node x 8 GPUs | ROUNDS self-evolution rounds, then eval.
# Usage: bash recipes/run_qwen3_8b.sh [extra Hydra overrides, applied to every round]
#        DRY_RUN=1 bash recipes/run_qwen3_8b.sh   # compose + validate every round's config on CPU, print commands
# Rounds, flywheel and evaluation: recipes/_rounds.sh. Hyper-parameters and needs: recipes/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-8B}
NGPUS=${NGPUS:-8}
NNODES=${NNODES:-1}
ROLLOUT_TP=${ROLLOUT_TP:-2}
PPO_MAX_TOKEN_LEN=${PPO_MAX_TOKEN_LEN:-24576}
EXPERIMENT=${EXPERIMENT:-qwen3_8b_fsdp}
source recipes/_rounds.sh

# ---------------- backend: FSDP (verl's default model_engine=dp), vLLM rollout ----------------
BACKEND=(
  actor_rollout_ref.model.enable_gradient_checkpointing=True
  actor_rollout_ref.actor.fsdp_config.param_offload=False
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=False
  actor_rollout_ref.ref.fsdp_config.param_offload=True
  actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
  actor_rollout_ref.actor.checkpoint.save_contents='[model,optimizer,extra,hf_model]'
)
HF_SUBDIR=actor/huggingface   # FSDP checkpoints keep the full HF model here (save_contents hf_model)

selfemo_rounds "$@"
