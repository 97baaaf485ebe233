"""recipes/: every GPU recipe's DRY_RUN=1 composes and validates each round's config on CPU; the round loop
chains D_r -> flywheel -> D_{r+1} and checkpoints; the scripts follow STYLE §7.

The dry runs call the real `recipes/check_config.py` (Hydra compose of selfemo_trainer.yaml + verl's
validate_config + verl's estimator/reward loaders). The loop test runs `_rounds.sh` for real with a stand-in
PYTHON that records each command and fakes the trainer's checkpoint (no GPU can train here).
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
    assert any(" -m selfemo_verl.evaluate generate --model " in c and "round_2" in c for c in commands)
    assert not (tmp_path / "round_0" / "ckpt").exists()  # reason: nothing trained


def test_dry_run_with_a_llama_model_path_and_two_rounds(tmp_path):
    llama = "meta-llama/Llama-3.1-8B-Instruct"
    result = _run("run_qwen3_8b_megatron.sh", tmp_path, {"MODEL_PATH": llama, "ROUNDS": "2", "NGPUS": "16"})
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = _config(tmp_path, 0)
    assert cfg["actor_rollout_ref"]["model"]["path"] == llama and cfg["trainer"]["n_gpus_per_node"] == 16
    assert not (tmp_path / "round_2").exists()
    assert sum("data_prep/flywheel.py" in line for line in result.stdout.splitlines()) == 1


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
# Stand-in for python: records the command. `-m selfemo_verl.main` fakes a finished round (an HF checkpoint and
# one dumped episode on row 0); data_prep/flywheel.py runs for real.
echo "$*" >> "$CALLS"
if [ "$1 $2" = "-m selfemo_verl.main" ]; then
  for a in "$@"; do
    case $a in trainer.default_local_dir=*) ckpt=${a#*=};; selfemo.dump.dir=*) dumps=${a#*=};; esac
  done
  mkdir -p "$ckpt/global_step_7/$HF_SUBDIR_EXPECTED"
  [ -n "${NO_HF:-}" ] || echo '{}' > "$ckpt/global_step_7/$HF_SUBDIR_EXPECTED/config.json"
  echo 7 > "$ckpt/latest_checkpointed_iteration.txt"
  "$REAL_PYTHON" -c "$WRITE_DUMP" "$dumps"
elif [ "$1" = data_prep/flywheel.py ]; then
  exec "$REAL_PYTHON" "$@"
fi
"""
WRITE_DUMP = """
import sys
from selfemo_verl.episodes import write_step
sp = {"label_space": "meld", "stated": ["joy"], "stated_status": "ok", "judged": ["joy"], "judged_status": "ok",
      "reply": "Way to go!", "judge_agreement": 1.0}
rec = {"uid": "u", "index": 0, "data_source": "selfemo/meld", "selfemo": sp, "rewards": {"r_rec": 0.5}}
write_step(sys.argv[1], 7, [rec])
"""


def _fake_run(tmp_path: Path, script: str, **env) -> tuple[subprocess.CompletedProcess, Path]:
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
    env = {"DRY_RUN": "0", "CALLS": str(calls), "REAL_PYTHON": sys.executable, "WRITE_DUMP": WRITE_DUMP, **env}
    return _run(script, tmp_path / "out", env, python=str(fake)), calls


@pytest.mark.parametrize("script", ["run_qwen3_8b.sh", "run_qwen3_8b_megatron.sh"])
def test_round_loop_chains_flywheel_data_and_checkpoints_and_a_rerun_skips_finished_rounds(script, tmp_path):
    hf = HF_SUBDIR[RECIPES[script]]
    result, calls = _fake_run(tmp_path, script, HF_SUBDIR_EXPECTED=hf)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = calls.read_text().splitlines()
    assert [line.split()[1] if line.startswith("-m") else line.split()[0] for line in lines] == [
        "selfemo_verl.main", "data_prep/flywheel.py", "selfemo_verl.main", "data_prep/flywheel.py",
        "selfemo_verl.main", "selfemo_verl.evaluate", "selfemo_verl.evaluate"]
    out = tmp_path / "out"
    assert f"actor_rollout_ref.model.path={out / 'round_1' / 'ckpt' / 'global_step_7' / hf}" in lines[4]
    assert f"data.train_files={out / 'round_2' / 'train.parquet'}" in lines[4]
    assert f"--model {out / 'round_2' / 'ckpt' / 'global_step_7' / hf}" in lines[5]
    # reason: the real flywheel turned each round's dumped episode into a synthetic row of the next round
    for r in (1, 2):
        summary = json.loads((out / f"round_{r}" / "train.parquet.summary.json").read_text())
        assert summary["config"]["round"] == r and summary["output"]["synthetic"] >= 1
    assert _run_again_skips_training(tmp_path, script, hf)


def _run_again_skips_training(tmp_path: Path, script: str, hf: str) -> bool:
    result, calls = _fake_run(tmp_path, script, HF_SUBDIR_EXPECTED=hf)
    assert result.returncode == 0, result.stderr[-3000:]
    return " -m selfemo_verl.main " not in f" {calls.read_text()}"  # reason: DONE rounds are not retrained


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
