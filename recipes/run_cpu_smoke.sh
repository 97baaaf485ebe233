#!/usr/bin/env bash
# SELF-EMO on CPU: the real verl 0.9.1 trainer (python -m selfemo_verl.main, SELF-GRPO) runs the real self-play
# loop on MELD with the tiny Qwen3 primed on the answer format (selfemo_verl.cpu.assets.primed_tiny_model_dir:
# it answers in tags with random labels, so episodes of a group differ and advantages are non-zero), through the
# CPU backend (platform "cpu", rollout "hf"). Actor, reference and rollout compute in fp32 on every CPU
# (selfemo_verl.cpu.launch.precision_overrides; the log's "precision=" line names the CPU's capability).
# Writes one JSON object per step to $OUT_DIR/metrics.jsonl (verl's "file" logger) and one per weight sync to
# $OUT_DIR/weight_sync.jsonl. Usage: recipes/run_cpu_smoke.sh [extra hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STEPS=${STEPS:-2}
OUT_DIR=${OUT_DIR:-outputs/cpu_smoke}
RAW_DIR=${RAW_DIR:-../shared/data/meld}
WINDOW=${WINDOW:-4}                      # dialogue turns per prompt (the GPU recipes use 12)
ROLLOUT=${ROLLOUT:-hf}                   # hf (our server) or vllm (verl's replica; .venv-vllm, make test-vllm)
HEAD_DIM=$( [ "$ROLLOUT" = vllm ] && echo 32 || echo 16 )   # vLLM's CPU attention needs head_dim >= 32
MODEL_PATH=${MODEL_PATH:-$($PYTHON -c "from selfemo_verl.cpu.assets import primed_tiny_model_dir as d; print(d(head_dim=$HEAD_DIM))")}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
DATA_DIR=${DATA_DIR:-$OUT_DIR/data}

if [ ! -f "$DATA_DIR/train.parquet" ]; then
  $PYTHON data_prep/prepare_erc.py --dataset meld --raw-dir "$RAW_DIR" --out-dir "$DATA_DIR" --window "$WINDOW"
fi
eval "$($PYTHON -m selfemo_verl.cpu.launch env "$ROLLOUT")"
mapfile -t CPU_OVERRIDES < <($PYTHON -m selfemo_verl.cpu.launch overrides "$ROLLOUT")
$PYTHON -m selfemo_verl.cpu.launch precision                 # one line for the log: fp32, CPU capability
rm -f "$OUT_DIR/metrics.jsonl" "$OUT_DIR/weight_sync.jsonl"
export VERL_FILE_LOGGER_PATH="$OUT_DIR/metrics.jsonl"     # verl's "file" logger: one JSON object per step
export SELFEMO_HF_SYNC_LOG="$OUT_DIR/weight_sync.jsonl"   # hf rollout: one JSON object per weight sync

# ---------------- algorithm: SELF-GRPO (selfemo_trainer.yaml defaults), no KL ----------------
ALGORITHM=(
  algorithm.adv_estimator=self_grpo
  algorithm.use_kl_in_reward=False
  actor_rollout_ref.actor.use_kl_loss=False
)
# ---------------- data: MELD parquet from data_prep/prepare_erc.py ----------------
DATA=(
  data.train_files="$DATA_DIR/train.parquet"
  data.val_files="$DATA_DIR/val.parquet"
  data.train_batch_size=4
  data.max_prompt_length=512
  data.max_response_length=128
  data.dataloader_num_workers=0
)
# ---------------- self-play episode: short generations for a tiny model ----------------
AGENT=(
  selfemo.agent.window="$WINDOW"
  selfemo.agent.max_tokens.recognize=16
  selfemo.agent.max_tokens.respond=32
  selfemo.agent.max_tokens.judge=16
  actor_rollout_ref.rollout.agent.num_workers=1
)
# ---------------- model, actor, rollout ----------------
MODEL=(
  actor_rollout_ref.model.path="$MODEL_PATH"
  actor_rollout_ref.actor.optim.lr=1e-4
  actor_rollout_ref.actor.ppo_mini_batch_size=4
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4
  actor_rollout_ref.rollout.n=2
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4
)
# ---------------- reward: reward_fns/selfemo_reward.py ----------------
REWARD=(
  reward.num_workers=1
  reward.custom_reward_function.path="$PWD/reward_fns/selfemo_reward.py"
  reward.custom_reward_function.name=compute_score
)
# ---------------- trainer ----------------
TRAINER=(
  trainer.logger='["console","file"]'
  trainer.project_name=selfemo_cpu
  trainer.experiment_name=smoke
  trainer.total_training_steps="$STEPS"
  trainer.val_before_train=False
  trainer.test_freq=-1
  trainer.save_freq=-1
  trainer.default_local_dir="$OUT_DIR/ckpt"
)

exec $PYTHON -m selfemo_verl.main "${CPU_OVERRIDES[@]}" "${ALGORITHM[@]}" "${DATA[@]}" "${AGENT[@]}" \
  "${MODEL[@]}" "${REWARD[@]}" "${TRAINER[@]}" "$@"
