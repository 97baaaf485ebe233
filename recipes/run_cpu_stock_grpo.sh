#!/usr/bin/env bash
# Stock verl GRPO (python -m verl.trainer.main_ppo, single_turn_agent loop) on CPU with the tiny random Qwen3,
# a toy parquet and a toy reward: proves the CPU backend (platform "cpu", rollout "hf") runs the real trainer.
# Usage: recipes/run_cpu_stock_grpo.sh [extra hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STEPS=${STEPS:-2}
OUT_DIR=${OUT_DIR:-outputs/cpu_stock_grpo}
MODEL_PATH=${MODEL_PATH:-$($PYTHON -c "from selfemo_verl.cpu.assets import tiny_model_dir; print(tiny_model_dir())")}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
DATA_DIR=${DATA_DIR:-$OUT_DIR/data}
REWARD_FILE=$($PYTHON -c "import selfemo_verl.cpu.toy_task as t; print(t.__file__)")

$PYTHON -m selfemo_verl.cpu.toy_task "$DATA_DIR" >/dev/null
eval "$($PYTHON -m selfemo_verl.cpu.launch env)"
mapfile -t CPU_OVERRIDES < <($PYTHON -m selfemo_verl.cpu.launch overrides)
$PYTHON -m selfemo_verl.cpu.launch precision                 # one line for the log: fp32, CPU capability
rm -f "$OUT_DIR/metrics.jsonl" "$OUT_DIR/weight_sync.jsonl"
export VERL_FILE_LOGGER_PATH="$OUT_DIR/metrics.jsonl"     # verl's "file" logger: one JSON object per step
export SELFEMO_HF_SYNC_LOG="$OUT_DIR/weight_sync.jsonl"   # hf rollout: one JSON object per weight sync

# ---------------- algorithm ----------------
ALGORITHM=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=False
  actor_rollout_ref.actor.use_kl_loss=False
)
# ---------------- data ----------------
DATA=(
  data.train_files="$DATA_DIR/train.parquet"
  data.val_files="$DATA_DIR/val.parquet"
  data.train_batch_size=4
  data.max_prompt_length=64
  data.max_response_length=16
  data.dataloader_num_workers=0
)
# ---------------- model, actor, rollout ----------------
MODEL=(
  actor_rollout_ref.model.path="$MODEL_PATH"
  actor_rollout_ref.actor.optim.lr=1e-4
  actor_rollout_ref.actor.ppo_mini_batch_size=4
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
  actor_rollout_ref.rollout.n=2
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4
  actor_rollout_ref.rollout.agent.num_workers=1
)
# ---------------- reward ----------------
REWARD=(
  reward.num_workers=1
  reward.custom_reward_function.path="$REWARD_FILE"
  reward.custom_reward_function.name=compute_score
)
# ---------------- trainer ----------------
TRAINER=(
  trainer.logger='["console","file"]'
  trainer.project_name=selfemo_cpu
  trainer.experiment_name=stock_grpo
  trainer.total_training_steps="$STEPS"
  trainer.val_before_train=False
  trainer.test_freq=-1
  trainer.save_freq=-1
  trainer.default_local_dir="$OUT_DIR/ckpt"
)

exec $PYTHON -m verl.trainer.main_ppo "${CPU_OVERRIDES[@]}" "${ALGORITHM[@]}" "${DATA[@]}" "${MODEL[@]}" \
  "${REWARD[@]}" "${TRAINER[@]}" "$@"
