"""recipes/: every GPU recipe's DRY_RUN=1 composes and validates each round's config on CPU; the round loop
chains D_r -> flywheel -> D_{r+1} and checkpoints, selects the checkpoint with the best val weighted-F1 over all
rounds and evaluates test with it; the scripts follow STYLE §7.

The dry runs call the real `recipes/check_config.py` (Hydra compose of selfemo_trainer.yaml + verl's
validate_config + verl's estimator/reward loaders) and the real `selfemo_verl.model_select check`. The loop test
runs `_rounds.sh` for real with a stand-in PYTHON that records each command and fakes the trainer (checkpoints,
file-logger lines with val weighted-F1, one dumped episode); the flywheel and model selection run for real, and
the evaluation commands are parsed by the real `selfemo_verl.evaluate` CLI to see which model they would load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"run_qwen3_8b.sh": "fsdp", "run_qwen3_4b.sh": "fsdp", "run_qwen3_8b_megatron.sh": "megatron"}
HF_SUBDIR = {"fsdp": "actor/huggingface", "megatron": "actor/model/huggingface"}


def _run(script: str, out_dir: Path, extra_env=None, args=(), python=sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": python, "OUT_DIR": str(out_dir),
           "DATA_DIR": str(out_dir / "data"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(extra_env or {})}
    return subprocess.run(["bash", str(REPO / "recipes" / script), *args], capture_output=True, text=True, env=env,
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
        assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://selfemo_verl.reward"
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
        assert any(f" -m selfemo_verl.evaluate {mode} --selection {selection} " in c for c in commands)
    assert not any("--model" in c for c in commands if " -m selfemo_verl.evaluate " in c)
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


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for python: records the command. `-m selfemo_verl.main` runs FAKE_TRAIN; the flywheel and model selection
# run for real; `-m selfemo_verl.evaluate generate|consistency` records the model the real CLI would load.
echo "$*" >> "$CALLS"
case "$1 $2 $3" in
  "-m selfemo_verl.main "*) exec "$REAL_PYTHON" -c "$FAKE_TRAIN" "$@" ;;
  "-m selfemo_verl.model_select "*|data_prep/flywheel.py*) exec "$REAL_PYTHON" "$@" ;;
  "-m selfemo_verl.evaluate generate"|"-m selfemo_verl.evaluate consistency")
    exec "$REAL_PYTHON" -c "$WHICH_MODEL" "${@:3}" ;;
esac
"""
# A finished round as verl 0.9.1 leaves it: HF checkpoints at steps 5 and 7 (the last), the file logger's lines
# (step 0 = val_before_train; truncated like verl's "wb"), one dumped episode on row 0 for the flywheel.
FAKE_TRAIN = """
import json, os, sys
from pathlib import Path
from selfemo_verl.episodes import write_step
args = dict(a.split("=", 1) for a in sys.argv[3:])
ckpt, r = Path(args["trainer.default_local_dir"]), int(args["trainer.experiment_name"].rsplit("_r", 1)[1])
for step in (5, 7):
    (ckpt / f"global_step_{step}" / os.environ["HF_SUBDIR_EXPECTED"]).mkdir(parents=True, exist_ok=True)
    if not os.environ.get("NO_HF"):
        (ckpt / f"global_step_{step}" / os.environ["HF_SUBDIR_EXPECTED"] / "config.json").write_text("{}")
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
from selfemo_verl import eval_generate, evaluate
args = evaluate._parser().parse_args(sys.argv[1:])
model, checkpoint = eval_generate._model(args)
budgets = eval_generate.role_budgets(args.train_config, args.train_override, args.max_new_tokens)
with open(os.environ["CALLS"], "a") as calls:
    calls.write(f"EVAL {args.command} model={model} step={checkpoint['step']} budgets={budgets}\\n")
"""
# val weighted-F1 per round and step: the best (0.60) is round 1's step 5, neither a round's last step nor the last
# round; round 2 ties it later; round 0's step 0 (0.99, the starting model) has no checkpoint.
VAL_F1 = [{"0": 0.99, "5": 0.40, "7": 0.45}, {"0": 0.45, "5": 0.60, "7": 0.55}, {"0": 0.55, "5": 0.60, "7": 0.50}]


def _fake_run(tmp_path: Path, script: str, args=(), **env) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the recipe for real with the stand-in python, on a 4-row MELD-schema base parquet."""
    from selfemo_verl.erc_data import Dialogue, Turn, build_rows, write_splits

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    turns = (Turn("Ross", "Hi.", "neutral"), Turn("Rachel", "I got in!", "joy"), Turn("Ross", "No way.", "surprise"))
    if not (tmp_path / "out" / "data" / "train.parquet").exists():
        write_splits({"train": build_rows([Dialogue("1", turns)], "meld", "train")}, tmp_path / "out" / "data")
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {"DRY_RUN": "0", "CALLS": str(calls), "REAL_PYTHON": sys.executable, "FAKE_TRAIN": FAKE_TRAIN,
           "WHICH_MODEL": WHICH_MODEL, "VAL_F1": json.dumps(VAL_F1), **env}
    return _run(script, tmp_path / "out", env, args=args, python=str(fake)), calls


def _program(line: str) -> str:
    """'selfemo_verl.main', 'model_select check', 'evaluate report', 'data_prep/flywheel.py', 'EVAL', ..."""
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
    round_ = ["model_select check", "selfemo_verl.main"]
    assert [_program(line) for line in lines] == [
        *round_, "data_prep/flywheel.py", *round_, "data_prep/flywheel.py", *round_, "model_select select",
        "evaluate generate", "EVAL", "evaluate consistency", "EVAL", "evaluate report"]
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
    assert any(line.startswith("-m selfemo_verl.evaluate report") and "/eval/test_generate" in line
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
    assert "selfemo_verl.evaluate" not in calls.read_text()


def test_a_resumed_round_keeps_the_interrupted_attempts_metrics_for_selection(tmp_path):
    hf = HF_SUBDIR["fsdp"]
    r0 = tmp_path / "out" / "round_0"
    (r0 / "ckpt" / "global_step_3" / hf).mkdir(parents=True)  # reason: the attempt saved and validated step 3
    (r0 / "ckpt" / "global_step_3" / hf / "config.json").write_text("{}")
    (r0 / "metrics.jsonl").write_text(json.dumps({"step": 3, "data": {"val-core/selfemo/weighted_f1/meld": 0.9}}))
    result, _ = _fake_run(tmp_path, "run_qwen3_8b.sh", HF_SUBDIR_EXPECTED=hf, ROUNDS="1",
                          VAL_F1=json.dumps(VAL_F1[:1]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0.9" in (r0 / "metrics_attempt_1.jsonl").read_text()
    chosen = json.loads((tmp_path / "out" / "selection.json").read_text())["chosen"]
    assert (chosen["round"], chosen["step"]) == (0, 3)


def test_round_loop_stops_when_a_round_leaves_no_hf_model(tmp_path):
    result, calls = _fake_run(tmp_path, "run_qwen3_8b.sh", HF_SUBDIR_EXPECTED="actor/huggingface", NO_HF="1")
    assert result.returncode != 0 and "no HF model at" in result.stderr
    assert "flywheel" not in calls.read_text()


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_scripts_follow_the_house_style(script):
    text = (REPO / "recipes" / script).read_text()
    shared = (REPO / "recipes" / "_rounds.sh").read_text()
    assert "set -euo pipefail" in text and text.rstrip().endswith('"$@"')
    for banned in ("pkill", "ray stop", "custom_reward_function.path=reward_fns", "reward_model.reward_manager"):
        assert banned not in text + shared  # reason: STYLE §7, and reward.* keys only (no legacy keys)
    for var in ("MODEL_PATH", "NGPUS", "NNODES"):
        assert f"{var}=${{{var}:-" in text
    for var in ("DATA_DIR", "ROUNDS", "DATASET", "OUT_DIR"):
        assert f"{var}=${{{var}:-" in shared
    assert subprocess.run(["bash", "-n", str(REPO / "recipes" / script)]).returncode == 0
