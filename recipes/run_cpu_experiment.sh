#!/usr/bin/env bash
# The CPU experiment: does SELF-EMO's signal teach emotions beyond what recognition-only GRPO does, on 2 cores?
# From the same SmolLM2-135M-Instruct start, with the same seeds and the same training time (TRAIN_S seconds per
# run, selfemo.trainer.time_budget_s), train
#   selfemo:   the self-play agent loop (recognize + respond + blind judge) with SELF-GRPO (group consistency);
#   recognize: GRPO on recognition only (selfemo_recognize agent loop, verl's grpo);
# and score a fixed subset of N_DEV MELD-dev rows before training, every VAL_EVERY steps and after (verl's
# validation: accuracy, weighted-/macro-F1, parse failures, classes predicted, with the majority-class baseline of
# the same rows). Each trained model is also scored by `eval generate` (metrics.json, confusion_matrix.png).
# Writes $OUT_DIR/results.md and $OUT_DIR/val_weighted_f1.png. Not part of CI.
# Budget: about (TRAIN_S + 5 min) per run; the defaults (1 seed, 2 arms, TRAIN_S=1080) take about 50 minutes.
# Usage: bash recipes/run_cpu_experiment.sh [extra hydra overrides for both arms...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUT_DIR=${OUT_DIR:-outputs/cpu_experiment}
SEEDS=${SEEDS:-0}                 # one run per arm and seed (data.seed: the order of the training rows)
TRAIN_S=${TRAIN_S:-1080}          # training seconds per run (validations inside the loop included)
N_DEV=${N_DEV:-200}               # fixed MELD-dev rows (drawn once, seed 0)
VAL_EVERY=${VAL_EVERY:-4}         # validate every VAL_EVERY steps (and after the last step)
RAW_DIR=${RAW_DIR:-}              # raw MELD CSVs; unset: ../shared/data/meld when it exists, else downloaded
DATA_URL=${DATA_URL:-}            # download mirror of declare-lab/MELD (unset: the pinned GitHub commit)
WINDOW=${WINDOW:-4}               # dialogue turns per prompt (the demo's)
RECOGNIZE_TOKENS=24               # the recognizer's answer budget (training, validation, eval generate)
MODEL_PATH=${MODEL_PATH:-$($PYTHON -c "from selfemo_verl.cpu.assets import smollm2_dir; print(smollm2_dir())")}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
DATA_DIR=$OUT_DIR/data

# ---------------- data: MELD parquet, each arm's train split, the fixed dev subset ----------------
$PYTHON -m selfemo_verl.round_inputs data meld "$DATA_DIR/meld" --raw-dir "$RAW_DIR" --offline-dir ../shared/data/meld \
  --base-url "$DATA_URL" --window "$WINDOW"
$PYTHON -m selfemo_verl.experiment prepare "$DATA_DIR/meld" "$DATA_DIR" --n-dev "$N_DEV"

# ---------------- shared by both arms: the demo's episodes, on-policy update, time budget ----------------
COMMON=(
  data.val_files="$DATA_DIR/val.parquet"
  trainer.val_before_train=True
  trainer.test_freq="$VAL_EVERY"
  trainer.save_freq=100000                      # saved once: the last step always saves
  actor_rollout_ref.actor.checkpoint.save_contents='[hf_model]'
  selfemo.trainer.time_budget_s="$TRAIN_S"
  actor_rollout_ref.rollout.n=4
  actor_rollout_ref.actor.optim.lr=5e-5
  selfemo.agent.max_tokens.recognize="$RECOGNIZE_TOKENS"
  selfemo.agent.max_tokens.respond=48
  selfemo.agent.max_tokens.judge=24
  data.max_response_length=160                  # recognize 24 + role switch (72 SmolLM2 tokens) + respond 48 = 144
  algorithm.rollout_correction.bypass_mode=True
)
declare -A ARM=(
  [selfemo]="algorithm.adv_estimator=self_grpo"
  [recognize]="algorithm.adv_estimator=grpo"
)
evaluate() {  # eval generate on the dev subset: metrics.json and confusion_matrix.png in $2
  $PYTHON -m selfemo_verl.eval generate --backend hf --model "$1" --data "$DATA_DIR/val.parquet" --out "$2" \
    --train-override selfemo.agent.window="$WINDOW" --train-override selfemo.agent.max_tokens.recognize="$RECOGNIZE_TOKENS"
}

[ -f "$OUT_DIR/zero_shot/metrics.json" ] || evaluate "$MODEL_PATH" "$OUT_DIR/zero_shot"
for seed in $SEEDS; do
  for arm in selfemo recognize; do
    run=$OUT_DIR/${arm}_seed$seed
    [ -f "$run/dev_eval/metrics.json" ] && continue   # done in an earlier invocation (delete the folder to redo it)
    MODEL_PATH="$MODEL_PATH" OUT_DIR="$run" DATA_DIR="$DATA_DIR/$arm" WINDOW="$WINDOW" STEPS=100000 \
      bash recipes/run_cpu_smoke.sh "${COMMON[@]}" ${ARM[$arm]} data.seed="$seed" \
      trainer.experiment_name="experiment_${arm}_seed$seed" "$@"
    last=$(cat "$run/ckpt/latest_checkpointed_iteration.txt")
    evaluate "$run/ckpt/global_step_$last/actor/huggingface" "$run/dev_eval"
  done
done
$PYTHON -m selfemo_verl.experiment report "$OUT_DIR"
