"""SelfEmoTrainer (selfemo_verl/trainer.py): the v1 advantage step with group-level consistency, and the
contracts with the private verl 0.9.1 names it relies on (each fails loudly if verl changes)."""

import importlib.util
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from transfer_queue import KVBatchMeta

from selfemo_verl.advantage import self_grpo_advantage
from selfemo_verl.reward_fn import compute_score
from selfemo_verl.rewards import group_consistency, group_consistency_from_masks
from selfemo_verl.trainer import (
    N_LABELS,
    SelfEmoTaskRunner,
    SelfEmoTaskRunnerBase,
    SelfEmoTrainer,
    StepBudget,
    check_trainer_mode,
    sync_trainer_is,
)
from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput, AgentLoopWorker
from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
from verl.trainer.ppo.v1 import AgentLoopWorkerTQ, get_trainer_cls
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, PPOTrainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

# --import-mode=importlib keeps tests/ off sys.path, so load tests/fakes.py by file.
_spec = importlib.util.spec_from_file_location("selfemo_trainer_fakes", Path(__file__).with_name("fakes.py"))
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)

# Two prompts of 4 episodes each (MELD). Gold differs, predictions are the same: joy, joy, joy, anger.
GROUPS = {"uidA": ["anger"], "uidB": ["sadness"]}
PREDS = ["joy", "joy", "joy", "anger"]


@pytest.fixture(scope="module")
def config():
    with initialize_config_module(config_module="selfemo_verl.config", version_base=None):
        return compose(config_name="selfemo_trainer")


def _episode(uid, session, gold, pred, length):
    """One row the way AgentLoopWorkerTQ._agent_loop_postprocess stores it (reward from our compute_score)."""
    extra_info = {"label_space": "meld", "index": 0}
    result = compute_score("selfemo/meld", f"<emotion>{pred}</emotion>", gold, extra_info)
    out = AgentLoopOutput(
        prompt_ids=[1, 2, 3], response_ids=list(range(4, 4 + length)), response_mask=[1] * length,
        reward_score=result["score"], num_turns=2, metrics=AgentLoopMetrics(),
        extra_fields={"reward_extra_info": result},
    )
    row = out.as_dict()
    row.update(uid=uid, session_id=session, extra_info=extra_info, data_source="selfemo/meld",
               index=sorted(GROUPS).index(uid))
    return f"{uid}_{session}_0", row, {"status": "success"}


def _padding_row(template):
    """verl's synthetic padding row (padding_utils.construct_minimal_padding_template): mask 0, own uid."""
    row = dict(template, uid="padXYZ", response_mask=torch.zeros(1, dtype=torch.int64),
               rm_scores=torch.zeros(1), responses=torch.zeros(1, dtype=torch.int64))
    return "padXYZ_0_0", row, {"status": "success", "is_padding": True}


@pytest.fixture()
def stored_batch(monkeypatch):
    """A fake TransferQueue holding 8 real episodes + 1 padding row, patched into verl and our trainer."""
    fake = fakes.FakeTransferQueue()
    entries = [_episode(uid, s, gold, pred, length=3 + s)
               for uid, gold in GROUPS.items() for s, pred in enumerate(PREDS)]
    entries.append(_padding_row(entries[0][1]))
    keys, rows, tags = zip(*entries)
    fake.kv_batch_put(list(keys), "train", fields=list_of_dict_to_tensordict(list(rows)))
    monkeypatch.setattr("verl.trainer.ppo.v1.trainer_base.tq", fake)
    monkeypatch.setattr("selfemo_verl.trainer.tq", fake)
    return fake, KVBatchMeta(keys=list(keys), tags=list(tags), partition_id="train")


def _trainer(config):
    trainer = SelfEmoTrainer.__new__(SelfEmoTrainer)  # no Ray workers: only the advantage step is exercised
    trainer.config = config
    return trainer


def test_advantage_step_uses_group_consensus_not_per_sample_scores(config, stored_batch):
    fake, batch = stored_batch
    metrics = {}
    _trainer(config)._compute_advantage(batch, metrics)

    real = [k for k, t in zip(batch.keys, batch.tags) if not t.get("is_padding")]
    uids = np.array([k.split("_")[0] for k in real], dtype=object)
    scores = torch.tensor([float(fake.rows[("train", k)]["rm_scores"].sum()) for k in real])
    # reason: c_i from the group's label sets via the list-based core function (an independent path)
    c = np.concatenate([group_consistency([{p} for p in PREDS], [True] * 4, "meld", eps=0.1) for _ in GROUPS])
    np.testing.assert_allclose(c[:4], [1, 1, 1, 0.1 / 2.1], atol=1e-9)  # consensus {joy}
    expected, _ = self_grpo_advantage(scores[:, None], torch.ones(len(real), 1), uids, c)
    got = torch.stack([fake.rows[("train", k)]["advantages"][0] for k in real])
    torch.testing.assert_close(got, expected[:, 0], atol=1e-6, rtol=0)
    for k in real:  # broadcast over the whole (all-ones) response mask
        adv = fake.rows[("train", k)]["advantages"]
        assert torch.equal(adv, adv[:1].expand_as(adv))

    # reason: group A's per-sample scores favour the one "anger" (gold), consensus favours "joy" -> c differs
    assert scores[3] > scores[0] and c[3] < c[0]
    # reason: group B is all wrong (equal task reward); only consistency separates joy (+) from anger (-)
    assert len(set(scores[4:].tolist())) == 1
    assert (got[4:7] > 0).all() and got[7] < 0

    assert metrics["selfemo/zero_std_groups"] == 1.0  # group B; the padding group is not counted
    assert metrics["selfemo/consistency_mean"] == pytest.approx(float(c.mean()))
    assert metrics["selfemo/adv_clip_frac"] == 0.0
    assert metrics["selfemo/r_rec"] == pytest.approx(float(np.mean([compute_score("selfemo/meld", f"<emotion>{p}</emotion>", g)["r_rec"] for g in GROUPS.values() for p in PREDS])))
    assert fake.rows[("train", "padXYZ_0_0")]["advantages"].abs().sum() == 0


def test_per_role_feeds_the_recognizers_weighted_reward_to_the_estimator(config, stored_batch):
    fake, batch = stored_batch
    cfg = config.copy()
    cfg.algorithm.self_grpo.per_role = True
    cfg.selfemo.reward.w_rec = 0.5  # reason: the recognizer's share is w_rec·r_rec, not the stored score R
    _set_info(fake, batch.keys[1], r_rec=0.5)  # reason: three distinct shares in group A; R stays as stored
    _trainer(cfg)._compute_advantage(batch, {})

    real = [k for k, t in zip(batch.keys, batch.tags) if not t.get("is_padding")]
    uids = np.array([k.split("_")[0] for k in real], dtype=object)
    r_rec = np.array([fake.rows[("train", k)]["extra_fields"]["reward_extra_info"]["r_rec"] for k in real])
    scores = torch.tensor([float(fake.rows[("train", k)]["rm_scores"].sum()) for k in real])
    c = np.concatenate([group_consistency([{p} for p in PREDS], [True] * 4, "meld", eps=0.1) for _ in GROUPS])
    # reason: every response token is the recognizer's here (all-ones masks), so A = SELF-GRPO of 0.5·r_rec + λ·c
    expected, _ = self_grpo_advantage(torch.tensor(0.5 * r_rec)[:, None], torch.ones(len(real), 1), uids, c)
    got = torch.stack([fake.rows[("train", k)]["advantages"][0] for k in real]).double()
    torch.testing.assert_close(got, expected[:, 0], atol=1e-6, rtol=0)
    default, _ = self_grpo_advantage(scores[:, None], torch.ones(len(real), 1), uids, c)
    assert not torch.allclose(got, default[:, 0].double(), atol=1e-3)  # reason: the fed share was used, not R


def _set_info(fake, key, **changes):
    fields = fake.rows[("train", key)]["extra_fields"]
    fake.rows[("train", key)]["extra_fields"] = {**fields, "reward_extra_info": {**fields["reward_extra_info"],
                                                                                 **changes}}


def test_infra_failures_get_zero_advantage_and_unparsed_answers_do_not_vote(config, stored_batch):
    fake, batch = stored_batch
    # group A: joy, joy, joy, anger. Episode 1 hit an infrastructure failure (its score is meaningless), episode
    # 2's answer did not parse (the policy's fault: it keeps its score, but neither votes nor scores consistency)
    infra_key, unparsed_key = batch.keys[1], batch.keys[2]
    _set_info(fake, infra_key, infra_error=1.0, score=0.0)
    _set_info(fake, unparsed_key, parse_ok=0.0, pred_mask=0)
    metrics = {}
    _trainer(config)._compute_advantage(batch, metrics)

    adv = {k: fake.rows[("train", k)]["advantages"][0].item() for k in batch.keys}
    assert adv[infra_key] == 0.0  # reason: docs/method.md §3.5, left out of training
    # reason: independent path: members of group A are episodes 0, 2, 3; the voters 0 and 3 tie (joy vs anger),
    # so both labels are in M and each voter scores (1 + eps) / (2 + eps); the unparsed episode gets c = 0
    members = [batch.keys[0], unparsed_key, batch.keys[3]]
    scores = torch.tensor([float(fake.rows[("train", k)]["rm_scores"].sum()) for k in members])
    tie = 1.1 / 2.1
    expected, _ = self_grpo_advantage(scores[:, None], torch.ones(3, 1), ["A"] * 3, [tie, 0.0, tie])
    got = torch.tensor([adv[k] for k in members])
    torch.testing.assert_close(got, expected[:, 0], atol=1e-6, rtol=0)
    real = [t for t in batch.tags if not t.get("is_padding")]
    assert metrics["selfemo/infra_error_rate"] == pytest.approx(1 / len(real))
    assert metrics["selfemo/infra_adv_abs_max"] == 0.0


def test_advantage_step_without_pred_mask_names_the_row(config, stored_batch):
    fake, batch = stored_batch
    fake.rows[("train", batch.keys[2])]["extra_fields"] = {"reward_extra_info": {"score": 1.0}}
    with pytest.raises(ValueError, match=f"row {batch.keys[2]}.*pred_mask"):
        _trainer(config)._compute_advantage(batch, {})


def test_padding_rows_need_no_pred_mask(config, stored_batch):
    fake, batch = stored_batch
    fake.rows[("train", "padXYZ_0_0")]["extra_fields"] = {}  # reason: verl builds padding rows, not our reward
    metrics = {}
    _trainer(config)._compute_advantage(batch, metrics)
    assert metrics["selfemo/zero_std_groups"] == 1.0


def test_widest_label_space_gives_the_same_consistency_as_the_own_one():
    # reason: the trainer uses n_labels = 7 for every dataset; IEMOCAP masks (6 bits) must not notice
    rng = np.random.default_rng(0)
    masks, groups = rng.integers(0, 2**6, 200), rng.integers(0, 30, 200)
    voters = masks > 0
    np.testing.assert_array_equal(group_consistency_from_masks(masks, voters, groups, N_LABELS, 0.1),
                                  group_consistency_from_masks(masks, voters, groups, 6, 0.1))
    assert N_LABELS == 7


def test_advantage_step_rejects_multi_output_episodes(config, stored_batch):
    fake, batch = stored_batch
    key, row, tag = _episode("uidA", 0, GROUPS["uidA"], "joy", length=3)  # a second output of session 0
    fake.kv_batch_put(["uidA_0_1"], "train", fields=list_of_dict_to_tensordict([row]))
    batch = KVBatchMeta(keys=batch.keys + ["uidA_0_1"], tags=batch.tags + [tag], partition_id="train")
    with pytest.raises(ValueError, match="one AgentLoopOutput per episode"):
        _trainer(config)._compute_advantage(batch, {})


def test_other_estimators_pass_through_without_selfemo_metrics(config, stored_batch):
    fake, batch = stored_batch
    cfg = config.copy()
    cfg.algorithm.adv_estimator = "grpo"
    metrics = {}
    _trainer(cfg)._compute_advantage(batch, metrics)
    assert not [m for m in metrics if m.startswith("selfemo/")]
    assert "advantages" in fake.rows[("train", batch.keys[0])]


def test_trainer_mode_must_be_v1_sync(config):
    check_trainer_mode(config)
    for key, value, message in [("use_v1", False, "use_v1"), ("v1.trainer_mode", "colocate_async", "sync")]:
        cfg = config.copy()
        cfg.trainer.merge_with({key.split(".")[0]: value} if "." not in key else {"v1": {"trainer_mode": value}})
        with pytest.raises(ValueError, match=message):
            check_trainer_mode(cfg)


def test_sync_trainer_is_swaps_and_restores_the_registry():
    with sync_trainer_is(SelfEmoTrainer):
        assert get_trainer_cls("sync") is SelfEmoTrainer
    assert get_trainer_cls("sync") is PPOTrainerSync
    with pytest.raises(TypeError):
        with sync_trainer_is(PPOTrainer):
            pass


def test_task_runner_is_a_ray_actor_over_verl_task_runner_v1():
    assert issubclass(SelfEmoTaskRunnerBase, TaskRunnerV1.__ray_actor_class__)
    assert SelfEmoTaskRunner.__ray_actor_class__ is SelfEmoTaskRunnerBase
    assert list(inspect.signature(run_ppo).parameters) == ["config", "task_runner_class"]


# ---- contracts with verl 0.9.1 private names (re-check on upgrade) --------------------------------------


def test_contract_ppo_trainer_compute_advantage():
    assert list(inspect.signature(PPOTrainer._compute_advantage).parameters) == ["self", "batch", "metrics"]
    assert PPOTrainerSync._compute_advantage is PPOTrainer._compute_advantage  # we override the base version
    src = inspect.getsource(PPOTrainer._compute_advantage)
    # rows reach the estimator in batch.keys order, with config.algorithm as `config`
    assert "tq.kv_batch_get(keys=batch.keys" in src and "config=self.config.algorithm" in src


def test_contract_task_runner_v1_run_reads_the_trainer_registry():
    run = TaskRunnerV1.__ray_actor_class__.run
    assert list(inspect.signature(run).parameters)[:2] == ["self", "config"]  # Ray adds _ray_trace_ctx
    assert "get_trainer_cls(config.trainer.v1.trainer_mode)" in inspect.getsource(run)
    assert TRAINER_REGISTRY["sync"] is PPOTrainerSync


def test_contract_reward_extra_info_lands_in_extra_fields_column():
    assert 'extra_fields["reward_extra_info"]' in inspect.getsource(AgentLoopWorker._compute_score)
    src = inspect.getsource(AgentLoopWorkerTQ.__ray_actor_class__._agent_loop_postprocess)
    assert 'f"{uid}_{session_id}_{i}"' in src and "output.as_dict()" in src
    assert "extra_fields" in AgentLoopOutput.model_fields


def test_contract_padding_rows_are_tagged():
    from verl.trainer.ppo import padding_utils

    assert "is_padding=True" in inspect.getsource(padding_utils.construct_minimal_padding_template)


def test_validation_metrics_are_corpus_level_weighted_f1_per_source():
    # reason: weighted-F1 of the gathered predictions, not the mean of per-sample scores
    from sklearn.metrics import f1_score

    from selfemo_verl.rewards import labels_to_mask
    from selfemo_verl.trainer import corpus_val_metrics

    gold = ["joy", "joy", "anger", "neutral", "neutral", "neutral"]
    pred = ["joy", "anger", "anger", "neutral", "joy", "neutral"]
    infos = {
        "pred_mask": [labels_to_mask({p}, "meld") for p in pred] + [1],
        "gold_mask": [labels_to_mask({g}, "meld") for g in gold] + [1],
    }
    sources = ["selfemo/meld"] * 6 + ["openai/gsm8k"]
    out = corpus_val_metrics(sources, infos)
    expected = f1_score(gold, pred, average="weighted")
    assert out["val-core/selfemo/weighted_f1/meld"] == pytest.approx(expected)
    assert out["val-core/selfemo/accuracy/meld"] == pytest.approx(4 / 6)
    assert out["val-aux/selfemo/parse_failure_rate/meld"] == 0.0
    assert out["val-aux/selfemo/classes_predicted/meld"] == 3  # reason: joy, anger, neutral
    assert out["val-aux/selfemo/majority_accuracy/meld"] == pytest.approx(3 / 6)  # reason: neutral, 3 of 6 golds
    assert out["val-aux/selfemo/majority_weighted_f1/meld"] == pytest.approx(
        f1_score(gold, ["neutral"] * 6, average="weighted", zero_division=0))
    assert not any("gsm8k" in key for key in out)
    assert corpus_val_metrics(sources, {"reward": [0.0] * 7}) == {}


def test_contract_val_metrics_update_signature():
    params = list(inspect.signature(PPOTrainer._val_metrics_update).parameters)
    assert params == ["self", "data_sources", "sample_uids", "reward_extra_infos_dict", "sample_turns",
                      "expected_acc_counts"]


def test_episode_dump_writes_every_real_episode_of_the_step(config, stored_batch, tmp_path):
    from omegaconf import OmegaConf

    from selfemo_verl.data.episode_dump import read_dumps

    fake, batch = stored_batch
    cfg = OmegaConf.merge(config, {"selfemo": {"dump": {"enable": True, "dir": str(tmp_path)}}})
    trainer = _trainer(cfg)
    trainer.global_steps = 7
    trainer._compute_advantage(batch, {})
    records, n_corrupt = read_dumps(tmp_path)
    assert n_corrupt == 0 and len(records) == 8  # the padding row is not an episode
    assert {r.step for r in records} == {7}
    assert sorted({(r.uid, r.index) for r in records}) == [("uidA", 0), ("uidB", 1)]
    stored = sorted((k.split("_")[0], fake.rows[("train", k)]["extra_fields"]["reward_extra_info"]["r_rec"])
                    for k, t in zip(batch.keys, batch.tags) if not t.get("is_padding"))
    assert sorted((r.uid, r.rewards["r_rec"]) for r in records) == stored


def test_dump_enabled_without_a_directory_is_a_config_error(config):
    from omegaconf import OmegaConf

    from selfemo_verl.trainer import check_dump_config

    with pytest.raises(ValueError, match="selfemo.dump.dir"):
        check_dump_config(OmegaConf.merge(config, {"selfemo": {"dump": {"enable": True}}}))


def test_step_budget_makes_the_next_step_last_when_one_more_would_overrun():
    budget = StepBudget(100.0)
    budget.begin(0.0)
    assert budget.end(20.0) is False  # reason: 20 + 2 * 20 = 60 <= 100
    budget.begin(20.0)  # reason: later steps do not move the start
    assert budget.end(40.0) is False  # reason: 40 + 2 * 20 = 80
    assert budget.end(70.0) is True  # reason: the longest step is now 30: 70 + 60 > 100, so step 4 is the last
    short = StepBudget(10.0)
    short.begin(5.0)
    assert short.end(25.0) is True  # reason: a first step longer than the whole budget: the next step is the last


def test_time_budget_lowers_total_training_steps_to_the_next_step(monkeypatch):
    from omegaconf import OmegaConf

    from selfemo_verl import trainer as trainer_module

    monkeypatch.setattr(PPOTrainerSync, "on_step_end", lambda self: None)  # reason: no rollout replicas to sync
    clock = iter([0.0, 30.0, 30.0, 75.0])
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: next(clock))
    t = object.__new__(SelfEmoTrainer)
    t.config = OmegaConf.create({"selfemo": {"trainer": {"time_budget_s": 120.0}}})
    t.step_budget, t.total_training_steps = StepBudget(120.0), 1000
    t.global_steps = 1
    t.on_step_begin(), t.on_step_end()
    assert t.total_training_steps == 1000  # reason: 30 + 2 * 30 = 90 <= 120
    t.global_steps = 2
    t.on_step_begin(), t.on_step_end()
    assert t.total_training_steps == 3  # reason: 75 + 2 * 45 > 120: step 3 is the last (it validates and saves)


def test_contract_fit_reads_total_training_steps_before_each_step_and_calls_the_step_hooks():
    src = inspect.getsource(PPOTrainer.fit)
    loop = src[src.index("while current_epoch"):]
    assert loop.index("is_last_step = self.global_steps >= self.total_training_steps") < loop.index(
        "self.on_step_begin()") < loop.index("self.on_step_end()")
    assert "self.global_steps <= self.total_training_steps" in loop  # reason: the loop ends after the last step
