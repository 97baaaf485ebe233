"""recipes/: every GPU recipe's DRY_RUN=1 composes and validates each round's config on CPU and refuses, with one
line naming the key and exit 2, what the cluster would refuse (issue 13); the round loop chains D_r -> flywheel ->
D_{r+1} and checkpoints (only from an export that holds its weights), selects the checkpoint with the best val
weighted-F1 over all rounds and evaluates test with it; on a fresh machine the data is downloaded (MELD) or
requested (IEMOCAP); the scripts follow the house style (set -euo pipefail, variables with defaults, no pkill
or ray stop).

The dry runs call the real `recipes/check_config.py` (Hydra compose of selfemo_trainer.yaml + verl's
validate_config + verl's estimator/reward loaders + selfemo_verl.preflight) and the real
`selfemo_verl.model_select check`. The dry runs set SKIP_IMPORT_CHECK=1 unless a test is about the package check
(vLLM, flash-attn, Megatron are not installed on the CPU machines). The loop test runs `_rounds.sh` for real with a
stand-in PYTHON that records each command and fakes the trainer (checkpoints with a tiny HF export, file-logger
lines with val weighted-F1, one dumped episode); the flywheel, model selection and `selfemo_verl.round_inputs` run
for real, and the evaluation commands are parsed by the real `selfemo_verl.eval` CLI to see which model they
would load. "A fresh machine" is a copy of recipes/ outside this checkout, where ../shared/data does not exist.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selfemo_verl.preflight import importable

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"run_qwen3_8b.sh": "fsdp", "run_qwen3_4b.sh": "fsdp", "run_qwen3_8b_megatron.sh": "megatron"}
HF_SUBDIR = {"fsdp": "actor/huggingface", "megatron": "actor/model/huggingface"}


def _run(script: str, out_dir: Path, extra_env=None, args=(), python=sys.executable,
         repo: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": python, "OUT_DIR": str(out_dir), "DATA_DIR": str(out_dir / "data"),
           "SKIP_IMPORT_CHECK": "1", "VERL_PLATFORM": None, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           **(extra_env or {})}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset it
    return subprocess.run(["bash", str(repo / "recipes" / script), *args], capture_output=True, text=True, env=env,
                          cwd="/", timeout=600)


def _config(out_dir: Path, r: int) -> dict:
    return yaml.safe_load((out_dir / f"round_{r}" / "config.yaml").read_text())


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_dry_run_composes_and_validates_every_round_with_our_plugin_names(script, tmp_path):
    result = _run(script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    strategy = RECIPES[script]
    for r in range(3):  # reason: ROUNDS defaults to 3
        assert f"round_{r}: ok | adv_estimator=self_grpo strategy={strategy}" in result.stdout
        cfg = _config(tmp_path, r)
        assert cfg["algorithm"]["adv_estimator"] == "self_grpo"
        assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://selfemo_verl.reward_fn"
        assert cfg["reward"]["custom_reward_function"]["name"] == "compute_score"
        assert cfg["reward"]["custom_reward_function"]["reward_kwargs"]["beta"] == 0.3
        assert cfg["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"] == "selfemo_self_play"
        assert cfg["actor_rollout_ref"]["actor"]["strategy"] == strategy
        assert cfg["actor_rollout_ref"]["rollout"]["n"] == 8
        assert cfg["actor_rollout_ref"]["actor"]["optim"]["lr"] == 1e-6
        assert cfg["selfemo"]["dump"] == {"enable": True, "dir": str(tmp_path / f"round_{r}" / "dumps")}
        assert cfg["trainer"]["default_local_dir"] == str(tmp_path / f"round_{r}" / "ckpt")
        # reason: model selection needs a kept checkpoint and a file-logger line at every validated step
        trainer = cfg["trainer"]
        assert trainer["save_freq"] == trainer["test_freq"] == 20 and trainer["max_actor_ckpt_to_keep"] is None
        assert "file" in trainer["logger"] and trainer["val_before_train"] is True
    # reason: round r+1 trains on the flywheel output of round r's dumps, from round r's last HF checkpoint
    for r in (1, 2):
        cfg = _config(tmp_path, r)
        assert cfg["data"]["train_files"] == str(tmp_path / f"round_{r}" / "train.parquet")
        model = cfg["actor_rollout_ref"]["model"]["path"]
        assert model == str(tmp_path / f"round_{r - 1}" / "ckpt" / "global_step_LAST" / HF_SUBDIR[strategy])
    assert _config(tmp_path, 0)["data"]["train_files"] == str(tmp_path / "data" / "train.parquet")
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert sum("data_prep/flywheel.py" in c for c in commands) == 2
    assert sum(" -m selfemo_verl.main " in c for c in commands) == 3
    rounds = " ".join(str(tmp_path / f"round_{r}") for r in range(3))
    selection = tmp_path / "selection.json"
    assert any(f" -m selfemo_verl.model_select select {rounds} --dataset meld " in c for c in commands)
    for mode in ("generate", "consistency"):  # reason: test is scored with the checkpoint chosen on val
        assert any(f" -m selfemo_verl.eval {mode} --selection {selection} " in c for c in commands)
    assert not any("--model" in c for c in commands if " -m selfemo_verl.eval " in c)
    assert not (tmp_path / "round_0" / "ckpt").exists()  # reason: nothing trained


def test_dry_run_with_a_llama_model_path_and_two_rounds(tmp_path):
    llama = "meta-llama/Llama-3.1-8B-Instruct"
    result = _run("run_qwen3_8b_megatron.sh", tmp_path, {"MODEL_PATH": llama, "ROUNDS": "2", "NGPUS": "16"})
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = _config(tmp_path, 0)
    assert cfg["actor_rollout_ref"]["model"]["path"] == llama and cfg["trainer"]["n_gpus_per_node"] == 16
    assert not (tmp_path / "round_2").exists()
    assert sum("data_prep/flywheel.py" in line for line in result.stdout.splitlines()) == 1


@pytest.mark.parametrize("env, args, message", [
    ({}, ["trainer.test_freq=5"], "trainer.save_freq=20 and trainer.test_freq=5 must be equal"),
    ({"VAL_FREQ": "0"}, [], "must be equal and > 0"),
    ({"LOGGER": '["console","wandb"]'}, [], 'lacks "file"'),
    ({}, ["trainer.max_actor_ckpt_to_keep=1"], "must be null"),
])
def test_dry_run_refuses_settings_that_leave_a_validated_step_without_a_checkpoint(tmp_path, env, args, message):
    result = _run("run_qwen3_8b.sh", tmp_path, {"ROUNDS": "1", **env}, args=args)
    assert result.returncode == 2, result.stdout[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("model_select: error: ")
    assert message in result.stderr
    assert " -m selfemo_verl.main " not in result.stdout  # reason: refused before any round starts


def test_dry_run_rejects_a_bad_override_with_exit_2(tmp_path):
    result = _run("run_qwen3_4b.sh", tmp_path, {"ROUNDS": "1"}, args=["algorithm.no_such_knob=1"])
    assert result.returncode == 2
    assert "check_config: error:" in result.stderr and "no_such_knob" in result.stderr


@pytest.mark.parametrize("override, message", [
    # reason: verl's validate_config runs (sampled validation needs temperature > 0)
    (["actor_rollout_ref.rollout.val_kwargs.do_sample=True", "actor_rollout_ref.rollout.temperature=0"],
     "validation gen temperature should be greater than 0"),
    (["trainer.v1.trainer_mode=colocate_async"], "needs trainer.v1.trainer_mode=sync"),  # reason: selfemo's check
])
def test_dry_run_runs_verl_and_selfemo_config_checks(tmp_path, override, message):
    result = _run("run_qwen3_8b.sh", tmp_path, {"ROUNDS": "1"}, args=override)
    assert result.returncode == 2, result.stdout[-2000:]
    assert "check_config: error:" in result.stderr and message in result.stderr


# Issue 13's doctored configs: each passed recipes/check_config.py once (use_dynamic_bsz=True makes verl's
# validate_config skip its batch checks); each fails on the cluster, so the dry run must fail: exit 2, one line
# naming the key and the reason.
DOCTORED = {
    "actor TP 3 x PP 2 on 8 GPUs": ("run_qwen3_8b_megatron.sh", {"ACTOR_TP": "3", "ACTOR_PP": "2"}, [],
                                    "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=3 x "
                                    "pipeline_model_parallel_size=2", "do not divide"),
    "rollout TP 3 on 8 GPUs": ("run_qwen3_8b.sh", {"ROLLOUT_TP": "3"}, [],
                               "actor_rollout_ref.rollout.tensor_model_parallel_size=3", "do not divide"),
    "512 episodes per mini-batch on 6 GPUs": ("run_qwen3_8b.sh", {"NGPUS": "6"}, [],
                                              "actor_rollout_ref.actor.ppo_mini_batch_size=64", "data-parallel size 6"),
    "gpu_memory_utilization 1.7": ("run_qwen3_8b.sh", {}, ["actor_rollout_ref.rollout.gpu_memory_utilization=1.7"],
                                   "actor_rollout_ref.rollout.gpu_memory_utilization=1.7", "must be in (0, 1]"),
    "model path /nonexistent": ("run_qwen3_4b.sh", {"MODEL_PATH": "/nonexistent"}, [],
                                "actor_rollout_ref.model.path=/nonexistent", "no such local directory"),
    # reason: recognize 64 + role switch ~74 (Qwen3 template) + respond 160 tokens do not fit in 100
    "max_response_length 100": ("run_qwen3_8b.sh", {}, ["data.max_response_length=100"],
                                "data.max_response_length=100", "too short for one episode"),
    "VERL_PLATFORM=cpu leaks in": ("run_qwen3_8b.sh", {"VERL_PLATFORM": "cpu"}, [], "VERL_PLATFORM=cpu",
                                   "CPU backend"),
    "rollout hf leaks in": ("run_qwen3_8b.sh", {}, ["actor_rollout_ref.rollout.name=hf"],
                            "actor_rollout_ref.rollout.name=hf", "not a GPU rollout"),
    "an override the v1 trainer ignores": ("run_qwen3_8b.sh", {}, ["trainer.balance_batch=True"],
                                           "trainer.balance_batch=True", "ignored by verl 0.9.1's v1 trainer"),
}


def _one_error_line(result: subprocess.CompletedProcess, prefix: str) -> str:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(prefix), result.stderr[-2000:]
    return result.stderr


@pytest.mark.parametrize("case", sorted(DOCTORED))
def test_dry_run_fails_a_doctored_config_with_one_line_naming_the_key(tmp_path, case):
    script, env, args, key, reason = DOCTORED[case]
    error = _one_error_line(_run(script, tmp_path, {"ROUNDS": "1", **env}, args=args), "check_config: error: ")
    assert f"round_0/overrides.txt: {key}" in error and reason in error


@pytest.mark.skipif(importable("megatron.core"), reason="megatron-core is installed on this machine")
def test_dry_run_of_the_megatron_recipe_fails_where_megatron_core_does_not_import(tmp_path):
    result = _run("run_qwen3_8b_megatron.sh", tmp_path, {"ROUNDS": "1", "SKIP_IMPORT_CHECK": None})
    error = _one_error_line(result, "check_config: error: ")
    assert "actor_rollout_ref.actor.strategy=megatron: needs `megatron.core`" in error and "pip install" in error


@pytest.mark.skipif(importable("vllm") or importable("flash_attn"), reason="GPU packages are installed here")
def test_a_laptop_dry_run_of_an_fsdp_recipe_passes_and_names_each_missing_gpu_package_once(tmp_path):
    result = _run("run_qwen3_8b.sh", tmp_path, {"ROUNDS": "2", "SKIP_IMPORT_CHECK": None})
    if torch.cuda.is_available():  # reason: with CUDA a missing vLLM is an error, as on the cluster
        assert result.returncode == 2 and "needs `vllm`" in result.stderr
        return
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("check_config: warning: ")]
    assert len(warnings) == 2  # reason: vllm and flash_attn, reported once for both rounds
    assert "needs `vllm`" in warnings[0] and "needs `flash_attn`" in warnings[1]
    assert all("this machine has no CUDA" in w for w in warnings)


def test_dry_run_prints_a_memory_estimate_per_round_and_warns_above_gpu_mem_gb(tmp_path):
    result = _run("run_qwen3_8b.sh", tmp_path, {"ROUNDS": "2", "GPU_MEM_GB": "30"})
    assert result.returncode == 0, result.stderr[-3000:]  # reason: a warning, not an error
    # reason: 8B, FSDP over 8 GPUs: (4 + 4 + 8) bytes/param / 8 = 16 GB; ref offloaded; vLLM 0.6 x 30 GB
    estimate = "memory per GPU ~ actor 16.0 + ref 0.0 + rollout 18.0 = 34.0 GB of GPU_MEM_GB=30"
    assert [line.split(":")[0] for line in result.stdout.splitlines() if estimate in line] == ["round_0", "round_1"]
    assert f"check_config: warning: round_0: {estimate}" in result.stderr
    assert "check_config: warning" not in _run("run_qwen3_8b.sh", tmp_path / "80", {"ROUNDS": "1"}).stderr


def test_a_local_model_is_measured_with_its_own_tokenizer_which_needs_a_chat_template(tmp_path):
    from selfemo_verl.cpu.assets import tiny_model_dir

    result = _run("run_qwen3_4b.sh", tmp_path / "own", {"ROUNDS": "2", "MODEL_PATH": str(tiny_model_dir())})
    assert result.returncode == 0, result.stderr[-3000:]
    # reason: round 1 starts from round 0's export of the same model, so it is measured the same way
    assert sum("response budget 512 >=" in line and "(its own tokenizer)" in line
               for line in result.stdout.splitlines()) == 2
    bare = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir(), bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    error = _one_error_line(_run("run_qwen3_4b.sh", tmp_path / "bare", {"ROUNDS": "1", "MODEL_PATH": str(bare)}),
                            "check_config: error: ")
    assert f"actor_rollout_ref.model.path={bare}: its tokenizer has no chat template" in error


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for python: records the command. `-m selfemo_verl.main` runs FAKE_TRAIN; the flywheel, model selection and
# round_inputs (data preparation, export check) run for real; `-m selfemo_verl.eval generate|consistency` records
# the model the real CLI would load.
echo "$*" >> "$CALLS"
case "$1 $2 $3" in
  "-m selfemo_verl.main "*) exec "$REAL_PYTHON" -c "$FAKE_TRAIN" "$@" ;;
  "-m selfemo_verl.model_select "*|"-m selfemo_verl.round_inputs "*|"-m selfemo_verl.ray_env "*|data_prep/flywheel.py*)
    exec "$REAL_PYTHON" "$@" ;;
  "-m selfemo_verl.eval generate"|"-m selfemo_verl.eval consistency")
    exec "$REAL_PYTHON" -c "$WHICH_MODEL" "${@:3}" ;;
esac
"""
# A finished round as verl 0.9.1 leaves it: HF checkpoints at steps 5 and 7 (the last; a tiny Qwen3 config.json and a
# safetensors file of its size, or config.json alone with NO_WEIGHTS, or nothing with NO_HF), the file logger's lines
# (step 0 = val_before_train; truncated like verl's "wb"), one dumped episode on row 0 for the flywheel.
FAKE_TRAIN = """
import json, os, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import save_file
from selfemo_verl.data.episode_dump import write_step
from selfemo_verl.preflight import estimate_params
args = dict(a.split("=", 1) for a in sys.argv[3:])
ckpt, r = Path(args["trainer.default_local_dir"]), int(args["trainer.experiment_name"].rsplit("_r", 1)[1])
hf = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 64, "hidden_size": 8,
      "num_hidden_layers": 1, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
      "tie_word_embeddings": True, "dtype": "bfloat16"}
for step in (5, 7):
    out = ckpt / f"global_step_{step}" / os.environ["HF_SUBDIR_EXPECTED"]
    out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("NO_HF"):
        (out / "config.json").write_text(json.dumps(hf))
    if not os.environ.get("NO_HF") and not os.environ.get("NO_WEIGHTS"):
        save_file({"weight": np.zeros(estimate_params(hf), np.float16)}, str(out / "model.safetensors"))
(ckpt / "latest_checkpointed_iteration.txt").write_text("7")
val = json.loads(os.environ["VAL_F1"])[r]
with open(os.environ["VERL_FILE_LOGGER_PATH"], "w") as f:
    for step, value in val.items():
        f.write(json.dumps({"step": int(step), "data": {"val-core/selfemo/weighted_f1/meld": value}}) + "\\n")
sp = {"label_space": "meld", "stated": ["joy"], "stated_status": "ok", "judged": ["joy"], "judged_status": "ok",
      "reply": "Way to go!", "judge_agreement": 1.0}
rec = {"uid": "u", "index": 0, "data_source": "selfemo/meld", "selfemo": sp, "rewards": {"r_rec": 0.5}}
write_step(args["selfemo.dump.dir"], 7, [rec])
"""
# The real CLI parses the recipe's evaluation command; record the model and the token budgets it would use.
WHICH_MODEL = """
import os, sys
from selfemo_verl.eval import generate
from selfemo_verl.eval.__main__ import _parser
args = _parser().parse_args(sys.argv[1:])
model, checkpoint = generate._model(args)
budgets = generate.role_budgets(args.train_config, args.train_override, args.max_new_tokens)
with open(os.environ["CALLS"], "a") as calls:
    calls.write(f"EVAL {args.command} model={model} step={checkpoint['step']} budgets={budgets}\\n")
"""
# val weighted-F1 per round and step: the best (0.60) is round 1's step 5, neither a round's last step nor the last
# round; round 2 ties it later; round 0's step 0 (0.99, the starting model) has no checkpoint.
VAL_F1 = [{"0": 0.99, "5": 0.40, "7": 0.45}, {"0": 0.45, "5": 0.60, "7": 0.55}, {"0": 0.55, "5": 0.60, "7": 0.50}]


def _fake_run(tmp_path: Path, script: str, args=(), repo: Path = REPO, base_parquet: bool = True,
              **env) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the recipe for real with the stand-in python, on a 4-row MELD-schema base parquet (unless `base_parquet`
    is False: then the recipe prepares DATA_DIR itself)."""
    from selfemo_verl.data.erc_data import Dialogue, Turn, build_rows, write_splits

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    turns = (Turn("Ross", "Hi.", "neutral"), Turn("Rachel", "I got in!", "joy"), Turn("Ross", "No way.", "surprise"))
    if base_parquet and not (tmp_path / "out" / "data" / "train.parquet").exists():
        write_splits({"train": build_rows([Dialogue("1", turns)], "meld", "train")}, tmp_path / "out" / "data")
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {"DRY_RUN": "0", "CALLS": str(calls), "REAL_PYTHON": sys.executable, "FAKE_TRAIN": FAKE_TRAIN,
           "WHICH_MODEL": WHICH_MODEL, "VAL_F1": json.dumps(VAL_F1), **env}
    return _run(script, tmp_path / "out", env, args=args, python=str(fake), repo=repo), calls


def _program(line: str) -> str:
    """'selfemo_verl.main', 'model_select check', 'eval report', 'data_prep/flywheel.py', 'EVAL', ..."""
    words = line.split()
    if words[0] != "-m":
        return words[0]
    return words[1] if words[1] == "selfemo_verl.main" else f"{words[1].split('.')[-1]} {words[2]}"


@pytest.mark.parametrize("script", ["run_qwen3_8b.sh", "run_qwen3_8b_megatron.sh"])
def test_round_loop_chains_flywheel_data_and_checkpoints_and_a_rerun_skips_finished_rounds(script, tmp_path):
    hf = HF_SUBDIR[RECIPES[script]]
    result, calls = _fake_run(tmp_path, script, HF_SUBDIR_EXPECTED=hf)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = calls.read_text().splitlines()
    round_ = ["ray_env overrides", "model_select check", "selfemo_verl.main", "round_inputs export"]
    assert [_program(line) for line in lines] == [
        "round_inputs data", *round_, "data_prep/flywheel.py", *round_, "data_prep/flywheel.py", *round_,
        "model_select select", "eval generate", "EVAL", "eval consistency", "EVAL", "eval report"]
    out = tmp_path / "out"
    last = [line for line in lines if _program(line) == "selfemo_verl.main"][2]
    # reason: round 2 starts from round 1's LAST checkpoint (step 7), not from the best one (step 5)
    assert f"actor_rollout_ref.model.path={out / 'round_1' / 'ckpt' / 'global_step_7' / hf}" in last
    assert f"data.train_files={out / 'round_2' / 'train.parquet'}" in last
    # reason: the real flywheel turned each round's dumped episode into a synthetic row of the next round
    for r in (1, 2):
        summary = json.loads((out / f"round_{r}" / "train.parquet.summary.json").read_text())
        assert summary["config"]["round"] == r and summary["output"]["synthetic"] >= 1
    assert _run_again_skips_training(tmp_path, script, hf)


def _run_again_skips_training(tmp_path: Path, script: str, hf: str) -> bool:
    result, calls = _fake_run(tmp_path, script, HF_SUBDIR_EXPECTED=hf)
    assert result.returncode == 0, result.stderr[-3000:]
    return " -m selfemo_verl.main " not in f" {calls.read_text()}"  # reason: DONE rounds are not retrained


def test_test_is_scored_with_the_best_val_checkpoint_over_all_rounds_and_the_report_names_it(tmp_path):
    hf = HF_SUBDIR["fsdp"]
    result, calls = _fake_run(tmp_path, "run_qwen3_8b.sh", HF_SUBDIR_EXPECTED=hf)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    best = out / "round_1" / "ckpt" / "global_step_5" / hf  # reason: 0.60 first reached there (see VAL_F1)
    chosen = json.loads((out / "selection.json").read_text())["chosen"]
    assert (chosen["round"], chosen["step"], chosen["val_weighted_f1"], chosen["path"]) == (1, 5, 0.60, str(best))
    evals = [line for line in calls.read_text().splitlines() if line.startswith("EVAL")]
    assert [line.split()[1:3] for line in evals] == [["generate", f"model={best}"], ["consistency", f"model={best}"]]
    assert any(line.startswith("-m selfemo_verl.eval report") and "/eval/test_generate" in line
               for line in calls.read_text().splitlines())


def test_the_recipe_passes_training_token_budget_overrides_to_the_evaluation(tmp_path):
    result, calls = _fake_run(tmp_path, "run_qwen3_8b.sh", args=["selfemo.agent.max_tokens.respond=200"],
                              HF_SUBDIR_EXPECTED=HF_SUBDIR["fsdp"], ROUNDS="1",
                              VAL_F1=json.dumps(VAL_F1[:1]))
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [line for line in calls.read_text().splitlines() if line.startswith("EVAL")]
    assert len(evals) == 2 and all("'respond': 200" in line for line in evals)
    assert all("'recognize': 64" in line for line in evals)  # reason: the YAML's default, untouched


def test_no_validated_checkpoint_stops_the_recipe_before_evaluation(tmp_path):
    result, calls = _fake_run(tmp_path, "run_qwen3_8b.sh", HF_SUBDIR_EXPECTED=HF_SUBDIR["fsdp"], ROUNDS="1",
                              VAL_F1=json.dumps([{"0": 0.5}]))  # reason: only the starting model was validated
    assert result.returncode == 2 and "model_select: error: no checkpoint to choose" in result.stderr
    assert "selfemo_verl.eval" not in calls.read_text()


def test_a_resumed_round_keeps_the_interrupted_attempts_metrics_for_selection(tmp_path):
    hf = HF_SUBDIR["fsdp"]
    r0 = tmp_path / "out" / "round_0"
    saved = r0 / "ckpt" / "global_step_3" / hf
    saved.mkdir(parents=True)  # reason: the attempt saved (a complete export) and validated step 3
    tiny = {"vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 16,
            "num_attention_heads": 2}
    (saved / "config.json").write_text(json.dumps(tiny))
    (saved / "model.safetensors").write_bytes(b"\0" * 8192)
    (r0 / "metrics.jsonl").write_text(json.dumps({"step": 3, "data": {"val-core/selfemo/weighted_f1/meld": 0.9}}))
    result, _ = _fake_run(tmp_path, "run_qwen3_8b.sh", HF_SUBDIR_EXPECTED=hf, ROUNDS="1",
                          VAL_F1=json.dumps(VAL_F1[:1]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0.9" in (r0 / "metrics_attempt_1.jsonl").read_text()
    chosen = json.loads((tmp_path / "out" / "selection.json").read_text())["chosen"]
    assert (chosen["round"], chosen["step"]) == (0, 3)


@pytest.mark.parametrize("env, message", [
    ({"NO_HF": "1"}, "no HF model (config.json)"),
    # reason: FSDP writes config.json even when no weights were saved; the next round would start from nothing
    ({"NO_WEIGHTS": "1"}, "config.json but no weight files"),
])
def test_round_loop_stops_with_exit_2_when_a_round_leaves_no_hf_weights(tmp_path, env, message):
    result, calls = _fake_run(tmp_path, "run_qwen3_8b.sh", HF_SUBDIR_EXPECTED="actor/huggingface", **env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("round_inputs: error: ")
    assert message in result.stderr and "round_0/ckpt/global_step_7/actor/huggingface" in result.stderr
    assert "flywheel" not in calls.read_text() and calls.read_text().count("-m selfemo_verl.main ") == 1


# ---------------------------------------------------------------- data on a fresh machine (issue 13, part 5)


@pytest.fixture
def meld_mirror(data_dir, tmp_path) -> str:
    """A file:// folder laid out like declare-lab/MELD at the pinned commit, holding the official MELD CSVs."""
    from selfemo_verl.data.erc_data import RAW_FILES
    from selfemo_verl.data.erc_download import REPO_DIRS

    folder = tmp_path / "mirror" / REPO_DIRS["meld"]
    folder.mkdir(parents=True)
    for name in RAW_FILES["meld"].values():
        shutil.copyfile(data_dir / "meld" / name, folder / name)
    return (tmp_path / "mirror").as_uri()


def _fresh_checkout(tmp_path: Path) -> Path:
    """recipes/ copied outside this checkout, so ../shared/data (our machines' offline copy) is not beside it."""
    repo = tmp_path / "fresh" / "repo"
    shutil.copytree(REPO / "recipes", repo / "recipes")
    (repo / "data_prep").symlink_to(REPO / "data_prep")
    return repo


def test_on_a_fresh_cluster_the_recipe_downloads_meld_into_the_data_dir_and_trains_on_it(tmp_path, meld_mirror):
    from selfemo_verl.data.erc_data import RAW_FILES

    result, calls = _fake_run(tmp_path, "run_qwen3_8b.sh", repo=_fresh_checkout(tmp_path), base_parquet=False,
                              ROUNDS="1", RAW_DIR=None, DATA_URL=meld_mirror, VAL_F1=json.dumps(VAL_F1[:1]),
                              HF_SUBDIR_EXPECTED=HF_SUBDIR["fsdp"])
    assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "out" / "data"
    assert sorted(p.name for p in (data / "raw").iterdir()) == sorted(RAW_FILES["meld"].values())
    assert all((data / f"{split}.parquet").is_file() for split in ("train", "val", "test"))
    assert f"--download --out-dir {data} --base-url {meld_mirror}" in result.stdout
    train = [line for line in calls.read_text().splitlines() if line.startswith("-m selfemo_verl.main ")]
    assert len(train) == 1 and f"data.train_files={data / 'train.parquet'}" in train[0]


def test_iemocap_without_raw_dir_stops_the_recipe_with_exit_2_asking_for_usc_copy(tmp_path):
    result = _run("run_qwen3_8b.sh", tmp_path / "out", {"DATASET": "iemocap", "RAW_DIR": None},
                  repo=_fresh_checkout(tmp_path))  # reason: a dry run too, since the real run would stop here
    error = _one_error_line(result, "round_inputs: error: RAW_DIR: ")
    assert "request it from USC (https://sail.usc.edu/iemocap/), then set RAW_DIR" in error
    assert not (tmp_path / "out" / "round_0").exists()


SMOKE_STUB = """#!/usr/bin/env bash
# Stand-in for recipes/run_cpu_smoke.sh: the data must be prepared; record what it would train on.
set -euo pipefail
test -f "$DATA_DIR/train.parquet"
echo "SMOKE DATA_DIR=$DATA_DIR WINDOW=$WINDOW" >> "$CALLS"
echo "SMOKE_ARGS $*" >> "$CALLS"
"""


def _demo(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    """`make demo` on a fresh machine: recipes/run_cpu_demo.sh for real, run_cpu_smoke.sh and python stood in."""
    repo = _fresh_checkout(tmp_path)
    (repo / "recipes" / "run_cpu_smoke.sh").write_text(SMOKE_STUB)
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "CALLS": str(calls),
           "OUT_DIR": str(tmp_path / "demo"), "MODEL_PATH": "stand-in", "RAW_DIR": "", "DATA_DIR": "", **env}
    return subprocess.run(["bash", str(repo / "recipes" / "run_cpu_demo.sh")], capture_output=True, text=True,
                          env=env, cwd="/", timeout=600), calls


def test_make_demo_on_a_fresh_machine_downloads_meld_then_trains_on_it(tmp_path, meld_mirror):
    import pyarrow.parquet as pq

    result, calls = _demo(tmp_path, DATA_URL=meld_mirror)
    assert result.returncode == 0, result.stderr[-3000:]
    data = tmp_path / "demo" / "data"
    assert (data / "raw" / "train_sent_emo.csv").is_file() and "--download" in result.stdout
    assert f"SMOKE DATA_DIR={data} WINDOW=4" in calls.read_text()
    rows = pq.read_table(data / "train.parquet").to_pylist()
    assert max(len(row["extra_info"]["window"]) for row in rows) == 4  # reason: prepared with the demo's window


def test_make_demo_prefers_the_offline_copy_when_shared_data_is_beside_the_checkout(tmp_path, data_dir):
    shutil.copytree(data_dir / "meld", tmp_path / "fresh" / "shared" / "data" / "meld")
    result, calls = _demo(tmp_path, DATA_URL=(tmp_path / "nowhere").as_uri())  # reason: a download would fail
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--raw-dir ../shared/data/meld" in result.stdout and not (tmp_path / "demo" / "data" / "raw").exists()
    assert "SMOKE DATA_DIR=" in calls.read_text()


def test_the_demos_response_budget_holds_a_whole_smollm2_episode(tmp_path, data_dir):
    from transformers import AutoTokenizer

    from selfemo_verl.cpu.assets import smollm2_dir

    shutil.copytree(data_dir / "meld", tmp_path / "fresh" / "shared" / "data" / "meld")
    result, calls = _demo(tmp_path, DATA_URL=(tmp_path / "nowhere").as_uri())
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in calls.read_text().splitlines() if line.startswith("SMOKE_ARGS ")]
    args = dict(arg.split("=", 1) for arg in line.split()[1:] if "=" in arg)  # the demo's overrides (they come last)
    spec = importlib.util.spec_from_file_location("check_config", REPO / "recipes" / "check_config.py")
    check_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_config)
    switch = check_config.role_switch_tokens(AutoTokenizer.from_pretrained(smollm2_dir()), "llama", {})
    need = int(args["selfemo.agent.max_tokens.recognize"]) + switch + int(args["selfemo.agent.max_tokens.respond"])
    # reason: with the smoke's 128 the responder got 32-48 of its 48 tokens (SmolLM2's role switch is 72 tokens) and
    # 81 % of a first step's episodes ran into the cap
    assert int(args["data.max_response_length"]) >= need, (args["data.max_response_length"], need)


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_scripts_follow_the_house_style(script):
    text = (REPO / "recipes" / script).read_text()
    shared = (REPO / "recipes" / "_rounds.sh").read_text()
    assert "set -euo pipefail" in text and text.rstrip().endswith('"$@"')
    for banned in ("pkill", "ray stop", "custom_reward_function.path=reward_fns", "reward_model.reward_manager"):
        assert banned not in text + shared  # reason: house style, and reward.* keys only (no legacy keys)
    for var in ("MODEL_PATH", "NGPUS", "NNODES"):
        assert f"{var}=${{{var}:-" in text
    for var in ("DATA_DIR", "ROUNDS", "DATASET", "OUT_DIR"):
        assert f"{var}=${{{var}:-" in shared
    assert subprocess.run(["bash", "-n", str(REPO / "recipes" / script)]).returncode == 0
