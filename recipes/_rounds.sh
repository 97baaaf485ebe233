# SELF-EMO self-evolution rounds, shared by recipes/run_qwen3_*.sh (sourced, not run).
#
# The recipe sets its model/backend variables and the BACKEND override array, sources this file, then calls
# `selfemo_rounds "$@"` ("$@" = extra Hydra overrides applied to every round). For r = 0 .. ROUNDS-1:
#   train    python -m selfemo_verl.main ... data.train_files=D_r  (episodes dumped to round_r/dumps)
#   flywheel python data_prep/flywheel.py --dumps round_r/dumps --base D_r --out round_{r+1}/train.parquet
#            (not after the last round)
#   round r+1 starts from round r's last HF checkpoint (fresh optimizer; the KL reference = that model too), once
#   `python -m selfemo_verl.round_inputs export` has found its weight files (config.json alone is not enough).
# D_0 = DATA_DIR/train.parquet, prepared once by `python -m selfemo_verl.round_inputs data`: from RAW_DIR when set,
# else from ../shared/data/$DATASET when it exists (our machines), else MELD / EmoryNLP are downloaded into
# DATA_DIR/raw (pinned commit, sha256-checked; DATA_URL = a mirror); IEMOCAP without RAW_DIR stops (exit 2).
# Every round validates and saves at the same steps (VAL_FREQ and its last step; checked before training by
# `python -m selfemo_verl.model_select check`) and keeps every checkpoint. Then model selection on val
# (docs/method.md §8.2): `python -m selfemo_verl.model_select select` picks, over all rounds, the checkpoint with
# the best val-core/selfemo/weighted_f1/<dataset> in round_r/metrics.jsonl (ties: the earlier) and writes
# OUT_DIR/selection.json; EVAL_SPLITS are scored once with that checkpoint (python -m selfemo_verl.eval
# generate/consistency --selection, same token budgets as training) and OUT_DIR/eval/report.md names it.
# A round whose round_r/DONE exists is not retrained, so re-running the recipe resumes where it stopped
# (inside a round, verl's trainer.resume_mode=auto resumes from the round's last checkpoint; verl's file logger
# truncates metrics.jsonl, so an interrupted attempt's lines are kept as metrics_attempt_<k>.jsonl).
#
# Multi-node (recipes/README.md "Cluster"): with RAY_ADDRESS set, the driver joins that Ray cluster (NNODES nodes x
# NGPUS) instead of starting one; `python -m selfemo_verl.ray_env check-shared` first checks that every node sees
# OUT_DIR and DATA_DIR (remote workers write checkpoints, dumps and metrics there). In every round, the exported
# variables the workers need (VERL_FILE_LOGGER_PATH, SELFEMO_*, VERL_*, ... : the list is selfemo_verl/ray_env.py)
# go to every Ray worker as `++ray_kwargs.ray_init.runtime_env.env_vars.*` overrides, on one node or many.
#
# DRY_RUN=1: write every round's overrides to OUT_DIR/round_r/overrides.txt, check them with recipes/check_config.py
# (compose + validate, plus what the cluster would refuse: GPU arithmetic, model path, response budget, packages;
# no GPU, no data, no model download needed) and print the exact commands; nothing is trained or downloaded.

PYTHON=${PYTHON:-python3}
DATASET=${DATASET:-meld}                     # meld | emorynlp | iemocap
RAW_DIR=${RAW_DIR:-}                         # raw dataset files (docs/method.md §13); unset: offline copy or download
DATA_URL=${DATA_URL:-}                       # download mirror of declare-lab/MELD (unset: the pinned GitHub commit)
DATA_DIR=${DATA_DIR:-data/$DATASET}          # {train,val,test}.parquet from data_prep/prepare_erc.py
OUT_DIR=${OUT_DIR:-outputs/$EXPERIMENT}      # round_r/{ckpt,dumps,train.parquet}, eval/
ROUNDS=${ROUNDS:-3}                          # self-evolution rounds (trainings); ROUNDS-1 flywheel stages
EPOCHS_PER_ROUND=${EPOCHS_PER_ROUND:-1}      # passes over D_r per round
SEED=${SEED:-0}                              # flywheel seed
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-256}    # prompts per step (x ROLLOUT_N episodes)
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-64}
ROLLOUT_N=${ROLLOUT_N:-8}                    # episodes per prompt (the GRPO group)
LR=${LR:-1e-6}
KL_LOSS_COEF=${KL_LOSS_COEF:-0.001}
BETA=${BETA:-0.3}                            # semantic smoothing of the reward (docs/method.md §3.2)
ROLLOUT_GPU_MEM=${ROLLOUT_GPU_MEM:-0.6}
VAL_FREQ=${VAL_FREQ:-20}                     # validate + save every VAL_FREQ steps and at each round's last step
LOGGER=${LOGGER:-'["console","file"]'}       # must hold "file" (model selection reads it); + "wandb" etc.
EVAL_SPLITS=${EVAL_SPLITS:-test}             # e.g. "val test"
THINKING=${THINKING:-false}                  # Qwen3 chat template enable_thinking (false: short answers, no <think>)
DRY_RUN=${DRY_RUN:-0}
RAY_ADDRESS=${RAY_ADDRESS:-}                 # host:port of a Ray cluster started beforehand (unset: a local one)

selfemo_common_overrides() {
  # ---------------- algorithm: SELF-GRPO (selfemo_trainer.yaml: adv_estimator=self_grpo) + KL loss ----------------
  ALGORITHM=(
    algorithm.adv_estimator=self_grpo
    algorithm.use_kl_in_reward=False
    actor_rollout_ref.actor.use_kl_loss=True
    actor_rollout_ref.actor.kl_loss_coef="$KL_LOSS_COEF"
    actor_rollout_ref.actor.kl_loss_type=low_var_kl
    actor_rollout_ref.actor.entropy_coeff=0
  )
  # ---------------- data: the round's parquet; prompts are short (12-turn window), so are the answers ----------------
  DATA=(
    data.val_files="$DATA_DIR/val.parquet"
    data.train_batch_size="$TRAIN_BATCH_SIZE"
    data.max_prompt_length=1024
    data.max_response_length=512
    data.filter_overlong_prompts=True
    data.truncation=error
    +data.apply_chat_template_kwargs.enable_thinking="$THINKING"
  )
  # ---------------- SELF-EMO: self-play agent loop, reward knobs ----------------
  SELFEMO=(
    actor_rollout_ref.rollout.agent.default_agent_loop=selfemo_self_play
    reward.custom_reward_function.path=pkg://selfemo_verl.reward_fn
    reward.custom_reward_function.name=compute_score
    selfemo.reward.beta="$BETA"
    selfemo.dump.enable=True
  )
  # ---------------- actor / rollout (verl's Qwen3-8B GRPO example for what SELF-EMO leaves open) ----------------
  ACTOR=(
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$PPO_MAX_TOKEN_LEN"
    actor_rollout_ref.rollout.name=vllm
    actor_rollout_ref.rollout.gpu_memory_utilization="$ROLLOUT_GPU_MEM"
    actor_rollout_ref.rollout.n="$ROLLOUT_N"
    actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu="$PPO_MAX_TOKEN_LEN"
    actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True
    actor_rollout_ref.ref.log_prob_max_token_len_per_gpu="$PPO_MAX_TOKEN_LEN"
  )
  # ---------------- trainer ----------------
  TRAINER=(
    trainer.logger="$LOGGER"
    trainer.project_name=selfemo
    trainer.n_gpus_per_node="$NGPUS"
    trainer.nnodes="$NNODES"
    trainer.save_freq="$VAL_FREQ"              # = test_freq: every validated step has a checkpoint to choose
    trainer.test_freq="$VAL_FREQ"
    trainer.val_before_train=True              # step 0: the round's starting model (reported, not a candidate)
    trainer.total_epochs="$EPOCHS_PER_ROUND"
    trainer.max_actor_ckpt_to_keep=null        # keep all for model selection (8B FSDP + optimizer: ~130 GB each)
  )
}

# Run (or, with DRY_RUN=1, print) one command.
selfemo_step() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

# The HF model directory of round r's last checkpoint, its weight files checked (a placeholder path under DRY_RUN).
selfemo_round_model() {
  if [ "$DRY_RUN" = 1 ]; then echo "$1/ckpt/global_step_LAST/$HF_SUBDIR"; return; fi
  "$PYTHON" -m selfemo_verl.round_inputs export "$1/ckpt" "$HF_SUBDIR"   # exit 2: no weights to start from
}

# verl's file logger truncates its file: keep an interrupted attempt's lines (model selection reads them all).
selfemo_keep_metrics() {
  local k=1
  if [ "$DRY_RUN" = 1 ] || [ ! -f "$1/metrics.jsonl" ]; then return 0; fi
  while [ -f "$1/metrics_attempt_$k.jsonl" ]; do k=$((k + 1)); done
  mv "$1/metrics.jsonl" "$1/metrics_attempt_$k.jsonl"
}

# Score EVAL_SPLITS once with the checkpoint chosen on val, with the training token budgets; write the report.
selfemo_evaluate() {
  local split mode a budgets=() reports=()
  for a in "$@"; do case $a in *selfemo.agent.max_tokens*|*selfemo.agent.window=*) budgets+=(--train-override "$a") ;; esac; done
  for split in $EVAL_SPLITS; do
    for mode in generate consistency; do
      selfemo_step "$PYTHON" -m selfemo_verl.eval "$mode" --selection "$OUT_DIR/selection.json" \
        --data "$DATA_DIR/$split.parquet" --out "$OUT_DIR/eval/${split}_$mode" \
        --chat-template-kwargs "{\"enable_thinking\": $THINKING}" "${budgets[@]}"
    done
    reports+=("$OUT_DIR/eval/${split}_generate")
  done
  selfemo_step "$PYTHON" -m selfemo_verl.eval report "${reports[@]}" --out "$OUT_DIR/eval/report.md"
}

selfemo_rounds() {
  DATA_DIR=$(realpath -m "$DATA_DIR") OUT_DIR=$(realpath -m "$OUT_DIR")  # absolute: Ray workers have another cwd
  selfemo_common_overrides
  mkdir -p "$OUT_DIR"
  local dry=(); if [ "$DRY_RUN" = 1 ]; then dry=(--dry-run); fi
  "$PYTHON" -m selfemo_verl.round_inputs data "$DATASET" "$DATA_DIR" --raw-dir "$RAW_DIR" \
    --offline-dir "../shared/data/$DATASET" --base-url "$DATA_URL" "${dry[@]}"   # no-op when the parquet exists
  if [ -n "$RAY_ADDRESS" ]; then   # waits for NNODES nodes; exit 2 unless each sees OUT_DIR and DATA_DIR
    selfemo_step "$PYTHON" -m selfemo_verl.ray_env check-shared --nodes "$NNODES" "$OUT_DIR" "$DATA_DIR"
  fi
  local base=$DATA_DIR/train.parquet model=$MODEL_PATH r rdir checks=() rdirs=() args=() ray_env=() lines
  for ((r = 0; r < ROUNDS; r++)); do
    rdir=$OUT_DIR/round_$r
    rdirs+=("$rdir")
    mkdir -p "$rdir"
    export VERL_FILE_LOGGER_PATH=$rdir/metrics.jsonl  # verl's "file" logger: one JSON object per step
    lines=$("$PYTHON" -m selfemo_verl.ray_env overrides)  # the exported variables every Ray worker must see
    ray_env=(); if [ -n "$lines" ]; then mapfile -t ray_env <<< "$lines"; fi
    args=("${ALGORITHM[@]}" "${DATA[@]}" "${SELFEMO[@]}" "${ACTOR[@]}" "${BACKEND[@]}" "${TRAINER[@]}"
      data.train_files="$base" actor_rollout_ref.model.path="$model" selfemo.dump.dir="$rdir/dumps"
      trainer.default_local_dir="$rdir/ckpt" trainer.experiment_name="${EXPERIMENT}_r$r" "${ray_env[@]}" "$@")
    "$PYTHON" -m selfemo_verl.model_select check "${args[@]}"  # save_freq = test_freq > 0, file logger, keep all
    if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "${args[@]}" > "$rdir/overrides.txt"; checks+=("$rdir/overrides.txt"); fi
    if [ -f "$rdir/DONE" ]; then
      echo "round $r: $rdir/DONE exists, not retrained"
    else
      selfemo_keep_metrics "$rdir"
      selfemo_step "$PYTHON" -m selfemo_verl.main "${args[@]}"
      if [ "$DRY_RUN" != 1 ]; then touch "$rdir/DONE"; fi
    fi
    model=$(selfemo_round_model "$rdir")
    if ((r + 1 < ROUNDS)); then
      selfemo_step "$PYTHON" data_prep/flywheel.py --dumps "$rdir/dumps" --base "$base" \
        --out "$OUT_DIR/round_$((r + 1))/train.parquet" --round $((r + 1)) --seed "$SEED"
      base=$OUT_DIR/round_$((r + 1))/train.parquet
    fi
  done
  selfemo_step "$PYTHON" -m selfemo_verl.model_select select "${rdirs[@]}" --dataset "$DATASET" \
    --hf-subdir "$HF_SUBDIR" --out "$OUT_DIR/selection.json"
  selfemo_evaluate "${args[@]}"
  if [ "$DRY_RUN" = 1 ]; then
    "$PYTHON" recipes/check_config.py "${checks[@]}"
  fi
}
