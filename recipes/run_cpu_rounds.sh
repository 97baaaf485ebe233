#!/usr/bin/env bash
# SELF-EMO self-evolution rounds on CPU: the round loop of recipes/_rounds.sh with recipes/run_cpu_smoke.sh as
# the training step (tiny random Qwen3, no test evaluation). For r = 0 .. ROUNDS-1:
#   train    run_cpu_smoke.sh on D_r from M_r: episodes -> OUT_DIR/round_r/dumps, HF model saved at the last step
#   flywheel data_prep/flywheel.py --dumps round_r/dumps --base D_r --out round_{r+1}/data/train.parquet
#   M_{r+1} = round_r/ckpt/global_step_STEPS/actor/huggingface
# Each round validates and saves every VAL_FREQ steps and at its last step; at the end, model selection on val
# (selfemo_verl.model_select, as in recipes/_rounds.sh) writes OUT_DIR/selection.json: the checkpoint with the best
# val weighted-F1 over all rounds (ties: the earlier).
# D_0 = DATA_DIR/train.parquet (val.parquet beside it is reused by every round), M_0 = MODEL_PATH.
# Env: ROUNDS (2), STEPS (per round, 2), VAL_FREQ (STEPS), OUT_DIR, DATA_DIR, MODEL_PATH, SEED (flywheel seed),
# FLYWHEEL_ARGS (extra flywheel flags, e.g. "--hard-range 0 1").
# Usage: recipes/run_cpu_rounds.sh [extra hydra overrides for every round]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-2}
SEED=${SEED:-0}
VAL_FREQ=${VAL_FREQ:-$STEPS}
OUT_DIR=$(realpath -m "${OUT_DIR:-outputs/cpu_rounds}")
DATA_DIR=$(realpath -m "${DATA_DIR:-$OUT_DIR/data}")
MODEL_PATH=${MODEL_PATH:-$($PYTHON -c "from selfemo_verl.cpu.assets import tiny_model_dir; print(tiny_model_dir())")}
read -r -a FLYWHEEL_EXTRA <<< "${FLYWHEEL_ARGS:-}"

# ---------------- model selection: validate + save at the same steps, file logger (checked up front) ----------------
SELECT=(trainer.save_freq="$VAL_FREQ" trainer.test_freq="$VAL_FREQ" trainer.logger='["console","file"]')
$PYTHON -m selfemo_verl.model_select check "${SELECT[@]}" "$@"

data=$DATA_DIR model=$MODEL_PATH rdirs=()
for ((r = 0; r < ROUNDS; r++)); do
  rdir=$OUT_DIR/round_$r
  rdirs+=("$rdir")
  rm -rf "$rdir/dumps" "$rdir/ckpt"   # a round is re-run from scratch (no resume into another round's checkpoint)
  OUT_DIR=$rdir DATA_DIR=$data STEPS=$STEPS MODEL_PATH=$model bash recipes/run_cpu_smoke.sh \
    selfemo.dump.enable=True selfemo.dump.dir="$rdir/dumps" "${SELECT[@]}" \
    actor_rollout_ref.actor.checkpoint.save_contents='[model,hf_model]' trainer.experiment_name="smoke_r$r" "$@"
  model=$($PYTHON -m selfemo_verl.round_inputs export "$rdir/ckpt" actor/huggingface)  # its weights checked
  if ((r + 1 < ROUNDS)); then
    next=$OUT_DIR/round_$((r + 1))/data
    mkdir -p "$next" && ln -sf "$DATA_DIR/val.parquet" "$next/val.parquet"
    $PYTHON data_prep/flywheel.py --dumps "$rdir/dumps" --base "$data/train.parquet" --out "$next/train.parquet" \
      --round $((r + 1)) --seed "$SEED" "${FLYWHEEL_EXTRA[@]}"
    data=$next
  fi
done
$PYTHON -m selfemo_verl.model_select select "${rdirs[@]}" --dataset meld --hf-subdir actor/huggingface \
  --out "$OUT_DIR/selection.json"
