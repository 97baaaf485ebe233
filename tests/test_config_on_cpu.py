"""selfemo_verl/config/selfemo_trainer.yaml composes over verl's ppo_trainer and carries every SELF-EMO knob."""

import inspect
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfemo_verl.advantage import SELF_GRPO_DEFAULTS, self_grpo_advantage
from selfemo_verl.rewards import REWARD_DEFAULTS

YAML = Path(__file__).resolve().parents[1] / "selfemo_verl" / "config" / "selfemo_trainer.yaml"
OVERRIDES = ["actor_rollout_ref.model.path=/tmp/tiny-model", "data.train_files=/tmp/t.parquet",
             "data.val_files=/tmp/v.parquet"]


@pytest.fixture(scope="module")
def config():
    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        return compose(config_name="selfemo_trainer", overrides=OVERRIDES)


def test_entrypoint_cfg_job_composes_with_self_grpo():
    cmd = [sys.executable, "-m", "selfemo_verl.main", "--cfg", "job", "--resolve", *OVERRIDES]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    job = yaml.safe_load(result.stdout)
    assert job["algorithm"]["adv_estimator"] == "self_grpo"
    assert job["reward"]["custom_reward_function"]["path"] == "pkg://selfemo_verl.reward_fn"
    assert job["actor_rollout_ref"]["rollout"]["agent"]["default_agent_loop"] == "selfemo_self_play"
    assert job["reward"]["custom_reward_function"]["reward_kwargs"] == job["selfemo"]["reward"]  # resolved
    assert job["trainer"]["use_v1"] is True and job["trainer"]["v1"]["trainer_mode"] == "sync"
    assert job["actor_rollout_ref"]["model"]["path"] == "/tmp/tiny-model"  # verl's own tree is underneath


@pytest.mark.parametrize("override, key", [
    ("selfemo.agent.temperature.respond=0.7", "selfemo.agent.temperature.respond"),  # reason: rollout default is 1.0
    ("trainer.v1.trainer_mode=colocate_async", "trainer_mode"),
])
def test_entrypoint_rejects_a_bad_config_with_one_line_and_exit_2_before_ray(override, key):
    cmd = [sys.executable, "-m", "selfemo_verl.main", *OVERRIDES, override]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    # reason: verl's import warnings may precede it; the error itself is the one last line, and no traceback
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("selfemo_verl.main: bad config:") and key in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_entrypoint_accepts_a_judge_temperature_of_its_own(config):
    from selfemo_verl.main import check_config

    cfg = config.copy()
    cfg.selfemo.agent.temperature.judge = 0.3  # reason: the judge is never trained
    cfg.selfemo.agent.temperature.recognize = cfg.actor_rollout_ref.rollout.temperature  # equal is on-policy
    check_config(cfg)


def test_self_grpo_yaml_defaults_equal_the_function_defaults(config):
    # reason: the registered wrapper falls back to the signature defaults under plain verl YAML
    defaults = {k: p.default for k, p in inspect.signature(self_grpo_advantage).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    defaults["per_role"] = SELF_GRPO_DEFAULTS.per_role  # reason: chooses the function, not one of its arguments
    assert OmegaConf.to_container(config.algorithm.self_grpo) == defaults


def test_knob_dataclass_defaults_equal_the_composed_yaml(config):
    # reason: RewardKnobs / SelfGrpoKnobs are the one copy of the YAML's defaults in code (the keyword defaults of
    # rewards.* and advantage.self_grpo_advantage read them)
    assert asdict(REWARD_DEFAULTS) == OmegaConf.to_container(config.selfemo.reward)
    assert asdict(SELF_GRPO_DEFAULTS) == OmegaConf.to_container(config.algorithm.self_grpo)


def test_verl_hands_selfemo_reward_knobs_to_compute_score(config):
    from verl.trainer.ppo.reward import get_custom_reward_fn

    fn = get_custom_reward_fn(config)  # verl's loader: partial(_call_with_kwargs, compute_score, reward_kwargs)
    assert fn.args[1] == OmegaConf.to_container(config.selfemo.reward)
    result = fn("selfemo/meld", "<emotion>joy</emotion>", ["joy"], {"label_space": "meld"})
    assert result["score"] == pytest.approx(1.0)  # reason: exact hit, no self-play parts


def test_selfemo_namespace_holds_the_agreed_keys(config):
    assert set(config.selfemo) == {"agent", "reward", "trainer", "dump"}
    assert set(config.selfemo.agent) == {"window", "self_play_turns", "judge_samples", "max_tokens", "temperature"}
    assert set(config.selfemo.agent.max_tokens) == set(config.selfemo.agent.temperature) == {
        "recognize", "respond", "judge"}
    assert set(config.selfemo.reward) == {"eps", "beta", "sigma", "r_invalid", "w_rec", "w_con", "w_und"}
    assert set(config.selfemo.dump) == {"enable", "dir"}
    assert set(config.selfemo.trainer) == {"time_budget_s"} and config.selfemo.trainer.time_budget_s is None


def test_every_yaml_key_has_a_comment_line_above_it():
    lines = YAML.read_text().splitlines()
    key = re.compile(r"^\s*[A-Za-z_][\w]*:")
    uncommented = [n + 1 for n, line in enumerate(lines)
                   if key.match(line) and (n == 0 or not lines[n - 1].lstrip().startswith("#"))]
    assert not uncommented, f"keys without a comment on lines {uncommented}"
