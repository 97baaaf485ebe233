"""Failed self-play episodes through verl 0.9.1's REAL v1 rollout post-processing and metric step.

Wiring (docs/method.md §6.8): an episode whose server failed — at its first call, by aborting, by timing out, by
returning garbage — must not crash the training step. The path below is verl's own, end to end on CPU:
parquet -> RLHFDataset -> collate -> uid + global_steps (as `PPOTrainer._fetch_one_gen_batch` /
`_next_train_batch` build it) -> `AgentLoopWorkerTQ.generate_sequences` (its `_run_prompt`, `_run_agent_loop`,
our loop, the streaming reward through verl's naive reward manager, `_agent_loop_postprocess` with
`list_of_dict_to_tensordict`) -> rows and tags in TransferQueue -> `PPOTrainer._compute_metrics`, verl's
function itself, whose `np.array([tag["min_global_steps"] ...], dtype=int)` casts killed the step with a
TypeError when a failed episode carried no weight version. Boundaries faked (tests/fakes.py): the rollout client
(ScriptedServer, returning exactly what `LLMServerClient.generate` returns), TransferQueue
(AsyncFakeTransferQueue), the reward actor handle (InlineRewardWorker); the advantage step's outputs are
written as zeros (that step has its own tests in test_trainer_on_cpu.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transfer_queue import KVBatchMeta

from selfemo_verl.prompts import recognize_messages
from verl.trainer.ppo.reward import load_reward_manager
from verl.trainer.ppo.v1 import AgentLoopWorkerTQ
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn
from verl.workers.rollout.replica import TokenOutput

# --import-mode=importlib keeps tests/ off sys.path, so load tests/fakes.py by file.
_spec = importlib.util.spec_from_file_location("selfemo_postprocess_fakes", Path(__file__).with_name("fakes.py"))
fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakes)

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "selfemo_verl" / "config" / "selfemo_trainer.yaml"
STEP = 3  # the trainer's global step
WINDOW = [
    {"speaker": "Ross", "text": "I got the job at the museum."},
    {"speaker": "Rachel", "text": "Oh my God, that is amazing!"},
]
RECOGNIZE, RESPOND, JUDGE = ("<emotion>joy</emotion>", "<emotion>surprise</emotion><reply>I know!</reply>",
                             "<emotion>surprise</emotion>")


def _garbage(ids, params):
    # a reply the real client passes on (it has extra_fields) that is no TokenOutput
    return SimpleNamespace(token_ids=[-1, "x"], log_probs=None, stop_reason=None, extra_fields={})


SERVERS = {
    # name: (trained script, judge script, infra_error)
    "healthy": ([RECOGNIZE, RESPOND], [JUDGE], 0),
    "first_call_raises": ([RuntimeError("replica died")], [JUDGE], 1),
    "every_call_raises": ([RuntimeError("down")], [RuntimeError("down")], 1),
    "first_call_aborted": ([TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": 2})],
                           [JUDGE], 1),
    "first_call_times_out": ([asyncio.TimeoutError()], [JUDGE], 1),
    "garbage_server": ([_garbage], [_garbage], 1),
    "judge_times_out": ([RECOGNIZE, RESPOND], [asyncio.TimeoutError()], 1),
    "empty_generation": ([TokenOutput(token_ids=[], log_probs=[], stop_reason="completed",
                                      extra_fields={"global_steps": 2})], [JUDGE], 0),
}


def _config(model_dir):
    """The project's Hydra config (selfemo_trainer.yaml over verl's ppo_trainer), sized for a CPU test."""
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.prompt_length=512", "actor_rollout_ref.rollout.response_length=96",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "data.max_prompt_length=512", "data.max_response_length=96",
        f"reward.custom_reward_function.path={REPO / 'reward_fns' / 'selfemo_reward.py'}",
    ]
    with initialize_config_dir(config_dir=str(YAML.parent), version_base=None):
        return compose(config_name=YAML.stem, overrides=overrides)


def _parquet(path):
    import pandas as pd

    info = dict(split="train", index=0, dialogue_id="d0", turn=1, speaker="Rachel", next_speaker="Ross",
                next_gold=["joy"], label_space="meld", origin="real", round=0, window=WINDOW)
    row = dict(data_source="selfemo/meld", ability="emotion_recognition", prompt=recognize_messages(WINDOW, "meld"),
               agent_name="selfemo_self_play", extra_info=info, reward_model={"style": "rule", "ground_truth": ["joy"]})
    pd.DataFrame([row]).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """verl's v1 worker (the Ray actor's plain class) on CPU, its reward path, and one train batch of one row."""
    from selfemo_verl.cpu.assets import tiny_model_dir

    model_dir = tiny_model_dir()
    config = _config(model_dir)
    mp = pytest.MonkeyPatch()
    tq = fakes.AsyncFakeTransferQueue()
    mp.setattr("verl.trainer.ppo.v1.agent_loop_tq.tq", tq)
    mp.setattr("verl.trainer.ppo.v1.trainer_base.tq", tq)
    worker = AgentLoopWorkerTQ.__ray_actor_class__(config, llm_client=None)
    dataset = RLHFDataset(data_files=str(_parquet(tmp_path_factory.mktemp("rows") / "rows.parquet")),
                          tokenizer=worker.tokenizer, config=config.data)
    yield SimpleNamespace(config=config, tq=tq, worker=worker, dataset=dataset)
    mp.undo()


def _attach_reward(setup):
    """verl's naive reward manager binds the running event loop when built: build it inside each test."""
    manager = load_reward_manager(setup.config, setup.worker.tokenizer)
    setup.worker.reward_loop_worker_handles = [fakes.InlineRewardWorker(manager)]


def _train_batch(dataset):
    """One prompt as `PPOTrainer._fetch_one_gen_batch` + `_next_train_batch` hand it to the rollout."""
    batch_dict = collate_fn([dataset[0]])
    batch_dict["uid"] = np.array([str(uuid.uuid4())], dtype=object)
    batch = tu.get_tensordict(batch_dict)
    tu.assign_non_tensor_data(batch, "global_steps", STEP)
    return batch


async def _rollout(setup, name):
    """Run one prompt (rollout.n = 1) through the v1 worker with the named server; its TransferQueue key."""
    trained, judge, _ = SERVERS[name]
    setup.worker.llm_client = fakes.ScriptedServer(setup.worker.tokenizer, trained=trained, judge=judge)
    batch = _train_batch(setup.dataset)
    await setup.worker.generate_sequences(batch)
    while setup.worker.background_tasks:  # verl fires the episodes as background tasks
        await asyncio.sleep(0.01)
    uid = batch["uid"][0]
    assert setup.tq.tags[("train", uid)]["status"] == "finished", name  # "failure": verl caught an exception
    return f"{uid}_0_0"


def _advantage_step_outputs(tq, keys):
    """What the advantage step writes before the metric step reads it (zeros: not under test here)."""
    for key in keys:
        row = tq.rows[("train", key)]
        row["advantages"] = torch.zeros(row["response_mask"].shape, dtype=torch.float32)
        row["returns"] = torch.zeros(row["response_mask"].shape, dtype=torch.float32)


def _metric_step(setup, keys):
    """verl 0.9.1's own `PPOTrainer._compute_metrics` on these rows, as the v1 trainer calls it at step STEP."""
    trainer = PPOTrainerSync.__new__(PPOTrainerSync)  # the mode selfemo runs; no Ray workers: only metrics
    trainer.config, trainer.use_critic = setup.config, False
    trainer._rollout_moe_lb_metrics_accumulator = None  # read only when moe_load_balance_metrics_interval > 0
    trainer.resource_pool_manager = SimpleNamespace(get_n_gpus=lambda: 1)
    batch = KVBatchMeta(keys=list(keys), tags=[setup.tq.tags[("train", k)] for k in keys], partition_id="train")
    metrics = {}
    trainer._compute_metrics(batch, metrics, {"step": 1.0, "gen": 0.5}, global_steps=STEP, epoch=0)
    return metrics


async def test_failed_episodes_pass_verls_v1_postprocess_and_metric_casts_beside_a_healthy_one(setup):
    _attach_reward(setup)
    keys = {name: await _rollout(setup, name) for name in SERVERS}
    rows = {name: setup.tq.rows[("train", key)] for name, key in keys.items()}
    tags = {name: setup.tq.tags[("train", key)] for name, key in keys.items()}

    for name, (_, _, infra) in SERVERS.items():
        record = rows[name]["extra_fields"]["selfemo"]
        assert record["infra_error"] == infra, name
        assert float(rows[name]["extra_fields"]["reward_extra_info"]["infra_error"]) == float(infra), name
        assert math.isfinite(float(rows[name]["rm_scores"].sum())), name
        # reason: every row carries every field a healthy row carries (TransferQueue drops a field any row lacks)
        assert set(rows[name]) == set(rows["healthy"]), name
        assert set(rows[name]["extra_fields"]) == set(rows["healthy"]["extra_fields"]), name
        # reason: the exact casts of trainer_base._compute_metrics, row by row
        np.array([tags[name]["min_global_steps"], tags[name]["max_global_steps"]], dtype=int)

    # reason: no server answered a trained call -> the sync trainer's weight version for step STEP (STEP - 1)
    for name in ("first_call_raises", "every_call_raises", "first_call_aborted", "first_call_times_out",
                 "garbage_server"):
        assert (tags[name]["min_global_steps"], tags[name]["max_global_steps"]) == (STEP - 1, STEP - 1), name
    assert (tags["healthy"]["min_global_steps"], tags["healthy"]["max_global_steps"]) == (7, 7)  # the server's

    _advantage_step_outputs(setup.tq, keys.values())
    metrics = _metric_step(setup, list(keys.values()))
    assert metrics["training/off_policy/trajectory_spans/max"] == 1
    assert metrics["training/off_policy/trajectory_staleness/max"] == (STEP - 1) - (STEP - 1)  # the failed rows: 0
    assert metrics["training/num_turns/min"] >= 1


async def test_metric_step_still_crashes_on_an_episode_without_weight_versions(setup):
    """The guard above can fail: a row tagged like the old first-call-failed episode kills verl's metric step."""
    _attach_reward(setup)
    key = await _rollout(setup, "healthy")
    _advantage_step_outputs(setup.tq, [key])
    setup.tq.tags[("train", key)].update(min_global_steps=None, max_global_steps=None)
    with pytest.raises(TypeError):
        _metric_step(setup, [key])
