"""CPU end-to-end: the real verl 0.9.1 trainer on a CPU through selfemo_verl.cpu (about 2 minutes per run on 2 cores).

- stock GRPO: `python -m verl.trainer.main_ppo` (single_turn_agent, toy reward) via recipes/run_cpu_stock_grpo.sh;
- SELF-EMO: `python -m selfemo_verl.main` (self-play loop, SELF-GRPO, MELD) via recipes/run_cpu_smoke.sh, with the
  tiny Qwen3 primed on the answer format (selfemo_verl.cpu.priming): it answers in tags with random labels, so the
  episodes of a group differ, advantages are non-zero and the policy gradient runs end to end;
- SELF-EMO with fault injection: the same run with the hf server failing a share of the calls it sees first
  (SELFEMO_HF_FAIL_FIRST_CALLS): the run completes, the failures are counted and the failed episodes get A = 0.
Each run is watched as a process tree: exit status 0, peak memory (PSS) within 8 GiB, no process left behind.
The SELF-EMO runs dump their episodes (selfemo.dump) so the logged metrics can be checked against them.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from selfemo_verl.cpu.faults import SHARE_ENV
from selfemo_verl.cpu.watch import run_watched
from selfemo_verl.data.episode_dump import read_dumps

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
PEAK_GIB = 8.0
PROMPTS_PER_STEP = 4  # data.train_batch_size of run_cpu_smoke.sh (4 groups of rollout.n = 2 episodes)
EPISODES_PER_STEP = 8
FAIL_SHARE = 0.25
# the smoke run's reward knobs are the YAML's defaults (r_invalid = 0: only parsed answers score above 0)
REWARD = OmegaConf.load(REPO / "selfemo_verl/config/selfemo_trainer.yaml").selfemo.reward


def _run(script: str, out_dir: Path, extra_env: dict, overrides: tuple = ()) -> tuple:
    env = {**os.environ, "OUT_DIR": str(out_dir), "STEPS": str(STEPS), **extra_env}
    cmd = ["bash", str(REPO / "recipes" / script), *overrides]
    report = run_watched(cmd, env=env, log_path=str(out_dir / "run.log"))
    log_tail = (out_dir / "run.log").read_text(errors="replace")[-4000:]
    assert report.returncode == 0, log_tail
    steps = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    sync_log = out_dir / "weight_sync.jsonl"  # written by the hf server only (the vLLM lane has none)
    syncs = [json.loads(line) for line in sync_log.read_text().splitlines()] if sync_log.exists() else []
    return report, steps, syncs


def _check_common(report, steps, syncs):
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))  # one JSON object per step
    for s in steps:
        assert math.isfinite(s["data"]["actor/grad_norm"])
    # one sync before training and one after each step; each loads every tensor of the rollout model
    assert len(syncs) == STEPS + 1
    for sync in syncs:
        assert sync["loaded"] == sync["received"] == sync["model_tensors"] > 0
        assert sync["missing"] == sync["unexpected"] == sync["mismatched"] == 0
        assert math.isfinite(sync["norm"]) and sync["norm"] > 0 and math.isfinite(sync["delta_norm"])
    # reason: sync 1 (before training) sends the actor's initial weights, which the server loaded itself from the
    # same checkpoint, so nothing moves
    assert syncs[0]["delta_norm"] == 0.0
    # the hf server decoded each step's concurrent requests together (continuous batching), not one at a time
    for sync in syncs[1:]:
        assert sync["generation"]["requests"] >= EPISODES_PER_STEP and sync["generation"]["peak_batch"] > 1, sync
    assert report.leftovers == [], f"processes left behind: {report.leftovers}"
    assert report.peak_pss_gib <= PEAK_GIB, f"peak PSS {report.peak_pss_gib:.2f} GiB"


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    return _run("run_cpu_stock_grpo.sh", tmp_path_factory.mktemp("stock"), {})


def test_stock_grpo_trains_two_steps_through_verl_main_ppo_on_cpu(stock_run):
    report, steps, syncs = stock_run
    _check_common(report, steps, syncs)
    scores = [s["data"]["critic/score/mean"] for s in steps]
    assert all(0.0 <= x <= 1.0 for x in scores)
    # reason: the toy reward is continuous, so samples differ and GRPO must produce a gradient
    assert max(s["data"]["actor/grad_norm"] for s in steps) > 0


def test_stock_grpo_rollout_logprobs_match_the_actor(stock_run):
    _, steps, _ = stock_run
    # the hf server's log-probs (processed, at the rollout temperature) agree with the FSDP actor's recompute
    for s in steps:
        assert s["data"]["training/rollout_probs_diff_max"] < 1e-3


@dataclass(frozen=True)
class SelfEmoRun:
    report: object
    steps: list  # metrics.jsonl: one {"step", "data"} per step
    syncs: list  # weight_sync.jsonl: one record per weight sync
    episodes: dict  # step -> the step's dumped episodes (selfemo_verl.data.episode_dump.EpisodeRecord)


def _selfemo_run(out_dir: Path, data_dir: Path, extra_env: dict) -> SelfEmoRun:
    dumps = out_dir / "dumps"
    report, steps, syncs = _run("run_cpu_smoke.sh", out_dir, {"RAW_DIR": str(data_dir / "meld"), **extra_env},
                                ("selfemo.dump.enable=true", f"selfemo.dump.dir={dumps}"))
    records, corrupt = read_dumps(dumps)
    assert corrupt == 0
    episodes = {step: [r for r in records if r.step == step] for step in range(1, STEPS + 1)}
    return SelfEmoRun(report, steps, syncs, episodes)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    env = {SHARE_ENV: ""}  # fault injection off, whatever the caller's environment says
    return _selfemo_run(tmp_path_factory.mktemp("smoke"), data_dir, env)


def test_selfemo_smoke_trains_two_steps_through_selfemo_main_on_cpu(smoke_run):
    _check_common(smoke_run.report, smoke_run.steps, smoke_run.syncs)
    for s in smoke_run.steps:
        assert s["data"]["num_turns/min"] >= 4  # recognize, role switch, respond (+ prompt): a self-play episode


def test_selfemo_smoke_rollout_logprobs_match_the_actor(smoke_run):
    # reason: actor and hf server both compute in fp32 (selfemo_verl.cpu.launch.precision_overrides); with verl's
    # default bf16 actor this primed model's probabilities disagreed by about 1e-2
    for s in smoke_run.steps:
        assert s["data"]["training/rollout_probs_diff_max"] < 1e-3, s["data"]["training/rollout_probs_diff_max"]


def test_selfemo_smoke_episodes_differ_within_a_group_so_advantages_are_nonzero(smoke_run):
    # reason: the primed model samples random labels, so some group's rewards differ; SELF-GRPO then gives its
    # members advantages of both signs (zero-mean within the group). A random model gave 0 everywhere.
    adv = [(s["data"]["critic/advantages/min"], s["data"]["critic/advantages/max"]) for s in smoke_run.steps]
    assert any(lo < 0.0 < hi for lo, hi in adv), adv
    assert any(s["data"]["selfemo/zero_std_groups"] < PROMPTS_PER_STEP for s in smoke_run.steps)


def test_selfemo_smoke_policy_gradient_is_finite_and_nonzero(smoke_run):
    for s in smoke_run.steps:
        data = s["data"]
        assert math.isfinite(data["actor/grad_norm"]) and math.isfinite(data["actor/pg_loss"])
        if data["critic/advantages/max"] > 0.0:  # a step with signal must move the policy
            assert data["actor/grad_norm"] > 0.0, data
    assert any(s["data"]["actor/grad_norm"] > 0.0 for s in smoke_run.steps)


def test_selfemo_smoke_each_step_changes_the_weights_the_server_receives(smoke_run):
    syncs = smoke_run.syncs
    for before, after in zip(syncs, syncs[1:]):
        # delta_norm = ‖w_{k+1} − w_k‖ over the received tensors: > 0, the step changed them. Weight decay alone
        # would only rescale w, for which ‖Δw‖ = |‖w_k‖ − ‖w_{k+1}‖| exactly; an optimizer step on a gradient
        # moves w off that ray, so ‖Δw‖ is well above the change of the norm.
        assert after["delta_norm"] > 0.0, after
        assert after["delta_norm"] > 2 * abs(after["norm"] - before["norm"]), (before, after)


def test_selfemo_smoke_model_parses_some_answers(smoke_run):
    # reason: r_invalid = 0, so a score above 0 needs a parsed answer; the primed model writes the tags
    assert REWARD.r_invalid == 0.0
    for s in smoke_run.steps:
        assert s["data"]["selfemo/parse_ok"] > 0.0 and s["data"]["critic/score/mean"] > 0.0


def test_selfemo_smoke_score_is_the_weighted_sum_of_its_components(smoke_run):
    w = (REWARD.w_rec, REWARD.w_con, REWARD.w_und)
    for s in smoke_run.steps:
        data, episodes = s["data"], smoke_run.episodes[s["step"]]
        assert len(episodes) == EPISODES_PER_STEP  # every real episode (verl adds no padding rows here)
        for e in episodes:  # R = w_rec r_rec + w_con r_con + w_und r_und (an absent term is 0.0)
            r = e.rewards
            assert r["score"] == pytest.approx(w[0] * r["r_rec"] + w[1] * r["r_con"] + w[2] * r["r_und"], abs=1e-9)
            assert 0.0 <= r["score"] <= sum(w)
        # verl's critic/score/mean is the mean of the same scores (float32 token rewards)
        assert data["critic/score/mean"] == pytest.approx(_mean(e.rewards["score"] for e in episodes), abs=1e-5)
        assert data["selfemo/r_rec"] == pytest.approx(_mean(e.rewards["r_rec"] for e in episodes), abs=1e-9)
        # from the logged means alone (r_con, r_und are averaged over the episodes that have the term, r_invalid 0):
        # w_rec r_rec <= score <= w_rec r_rec + w_con r_con + w_und r_und
        low = w[0] * data["selfemo/r_rec"]
        high = low + w[1] * data.get("selfemo/r_con", 0.0) + w[2] * data.get("selfemo/r_und", 0.0)
        assert low - 1e-5 <= data["critic/score/mean"] <= high + 1e-5, (low, data["critic/score/mean"], high)


def test_selfemo_smoke_computes_group_consistency(smoke_run):
    for s in smoke_run.steps:
        assert 0.0 <= s["data"]["selfemo/consistency_mean"] <= 1.0


def test_selfemo_smoke_logs_finite_reward_components(smoke_run):
    steps = smoke_run.steps
    # r_und exists only for episodes whose target has a real next turn (most MELD rows, not all)
    assert any("selfemo/r_und" in s["data"] for s in steps)
    for s in steps:
        assert all(math.isfinite(v) for k, v in s["data"].items() if k == "selfemo/r_und")
    keys = ["selfemo/r_rec", "selfemo/r_con", "selfemo/parse_ok"]
    for s in steps:
        assert all(math.isfinite(s["data"][k]) for k in keys)


def test_selfemo_smoke_has_no_infrastructure_failures(smoke_run):
    for s in smoke_run.steps:
        if "selfemo/infra_error_rate" in s["data"]:
            assert s["data"]["selfemo/infra_error_rate"] == 0.0
    assert not [e for step in smoke_run.episodes.values() for e in step if e.selfemo.get("infra_error")]


# ---------------- fault injection: the hf server fails a share of first calls ----------------


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory, data_dir):
    return _selfemo_run(tmp_path_factory.mktemp("faults"), data_dir, {SHARE_ENV: str(FAIL_SHARE)})


def _metric(run: SelfEmoRun, name: str) -> list:
    values = [s["data"].get(name) for s in run.steps]
    assert None not in values, f"metric {name} is missing from a step: {values}"  # reason: the trainer logs it
    return values


def test_selfemo_fault_run_completes_its_steps_despite_server_failures(fault_run):
    _check_common(fault_run.report, fault_run.steps, fault_run.syncs)
    errors = [e.selfemo.get("error") or "" for step in fault_run.episodes.values() for e in step]
    # reason: the agent loop records the server's exception; the injected one names itself
    assert any("InjectedServerError" in error for error in errors), errors


def test_selfemo_fault_run_logs_a_positive_infra_error_rate(fault_run):
    rates = _metric(fault_run, "selfemo/infra_error_rate")
    assert max(rates) > 0.0, rates
    for s, rate in zip(fault_run.steps, rates):  # the rate is the share of the step's episodes marked infra_error
        episodes = fault_run.episodes[s["step"]]
        assert all("infra_error" in e.selfemo for e in episodes)  # reason: every record carries the flag
        assert rate == pytest.approx(_mean(float(e.selfemo["infra_error"] == 1) for e in episodes))


def test_selfemo_fault_run_gives_failed_episodes_zero_advantage(fault_run):
    rates = _metric(fault_run, "selfemo/infra_error_rate")
    adv = _metric(fault_run, "selfemo/infra_adv_abs_max")
    assert max(rates) > 0.0
    # reason: docs/method.md §3.5, an infrastructure failure is left out of training: A = 0 for every such episode
    assert adv == [0.0] * STEPS, adv


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
