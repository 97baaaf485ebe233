"""selfemo_verl.cpu.hf_rollout: the hf rollout server body (no Ray), with and without injected faults."""

import json
import os

import pytest
import torch

from selfemo_verl.cpu import faults as faults_mod
from selfemo_verl.cpu.assets import tiny_model_dir


# ---------------- hf rollout server body (no Ray) ----------------


@pytest.fixture(scope="module")
def server():
    from verl.workers.config import HFModelConfig, RolloutConfig

    from selfemo_verl.cpu.hf_rollout import HFRolloutServerImpl

    # the replica hands the server verl's dataclasses (RolloutReplica.__init__ converts the rollout config)
    rollout = RolloutConfig(name="hf", prompt_length=64, response_length=8, dtype="float32")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFEMO_HF_THREADS", "1")  # as before issue 14: tests share the machine
        return HFRolloutServerImpl(config=rollout, model_config=HFModelConfig(path=str(tiny_model_dir())))


def test_server_loads_its_model_in_rollout_dtype_with_the_threads_asked(server, monkeypatch):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from selfemo_verl.cpu.hf_rollout import HFRolloutServerImpl, server_threads

    assert server.engine.model.dtype == torch.float32
    assert server.scheduler.max_batch == server.config.max_num_seqs  # verl's cap on running sequences
    assert server_threads({}) == max(1, len(os.sched_getaffinity(0)) - 1)  # one core for the agent/reward workers
    assert server_threads({"SELFEMO_HF_THREADS": "3"}) == 3
    threads = torch.get_num_threads()
    monkeypatch.setenv("SELFEMO_HF_THREADS", "1")
    try:
        bf16 = HFRolloutServerImpl(config=RolloutConfig(name="hf", prompt_length=64, response_length=8),
                                   model_config=HFModelConfig(path=str(tiny_model_dir())))
        assert bf16.engine.model.dtype == torch.bfloat16 and torch.get_num_threads() == 1  # verl's default dtype
    finally:
        torch.set_num_threads(threads)


async def test_server_generate_accepts_verls_call_and_returns_token_output(server):
    from verl.workers.rollout.replica import TokenOutput

    ids = server.engine.tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"]
    # the keyword arguments verl 0.9.1's LLMServerClient.generate passes
    out = await server.generate(request_id="r1", prompt_ids=ids, sampling_params={"temperature": 1.0, "top_p": 1.0,
                                "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}, image_data=None,
                                video_data=None)
    assert isinstance(out, TokenOutput) and 1 <= len(out.token_ids) <= 8  # default: response_length
    assert len(out.log_probs) == len(out.token_ids) and out.stop_reason == "completed"
    assert "global_steps" in out.extra_fields


async def test_server_update_weights_records_and_logs_sync_stats(server, tmp_path, monkeypatch):
    log = tmp_path / "sync.jsonl"
    monkeypatch.setenv("SELFEMO_HF_SYNC_LOG", str(log))
    named = list(server.engine.model.state_dict().items())
    stats = await server.update_weights(named, global_steps=3)
    assert stats["loaded"] == len(named) and stats["missing"] == 0 and stats["global_steps"] == 3
    assert server.weight_sync_stats()[-1] == stats
    logged = json.loads(log.read_text().splitlines()[-1])
    assert logged["loaded"] == len(named) and logged["delta_norm"] == 0.0 and logged["norm"] > 0


async def test_server_counts_a_sync_sent_in_several_buckets_once(server):
    from selfemo_verl.cpu.hf_rollout import buckets

    named = list(server.engine.model.state_dict().items())
    parts = list(buckets(named, max_bytes=64 << 10))
    assert len(parts) > 2 and [pair for part in parts for pair in part] == named  # order kept, nothing dropped
    await server.begin_weight_sync()
    for part in parts:
        await server.load_weight_bucket(part)
    stats = await server.finish_weight_sync(global_steps=4)
    assert stats["loaded"] == stats["model_tensors"] == len(named) and stats["missing"] == 0


def test_buckets_never_split_a_tensor_and_respect_the_size():
    from selfemo_verl.cpu.hf_rollout import buckets

    pairs = [("a", torch.zeros(10)), ("big", torch.zeros(100)), ("b", torch.zeros(10)), ("c", torch.zeros(10))]
    assert [[n for n, _ in b] for b in buckets(pairs, max_bytes=80)] == [["a"], ["big"], ["b", "c"]]


async def test_server_abort_returns_aborted_until_resumed(server):
    ids = server.engine.tokenizer("hi")["input_ids"]
    await server.abort_all_requests()
    out = await server.generate(prompt_ids=ids, sampling_params={"max_tokens": 4}, request_id="r2")
    assert out.stop_reason == "aborted" and out.token_ids == []
    await server.resume_generation()
    out = await server.generate(prompt_ids=ids, sampling_params={"max_tokens": 4, "ignore_eos": True}, request_id="r3")
    assert out.stop_reason == "completed" and len(out.token_ids) == 4


# ---------------- fault injection (SELFEMO_HF_FAIL_FIRST_CALLS) ----------------


def _faulty_server(monkeypatch, mode: str):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from selfemo_verl.cpu.hf_rollout import HFRolloutServerImpl

    monkeypatch.setenv(faults_mod.SHARE_ENV, "0.5")
    monkeypatch.setenv(faults_mod.MODE_ENV, mode)
    monkeypatch.setenv("SELFEMO_HF_THREADS", "1")
    rollout = RolloutConfig(name="hf", prompt_length=64, response_length=4, dtype="float32")
    return HFRolloutServerImpl(config=rollout, model_config=HFModelConfig(path=str(tiny_model_dir())))


async def test_server_with_faults_raises_on_a_share_of_first_calls_and_serves_retries(monkeypatch):
    server = _faulty_server(monkeypatch, "raise")
    ids = server.engine.tokenizer("hi")["input_ids"]
    outcomes = []
    for i in range(8):
        try:
            await server.generate(prompt_ids=ids, sampling_params={"max_tokens": 2}, request_id=f"r{i}")
            outcomes.append("ok")
        except faults_mod.InjectedServerError:
            outcomes.append("raised")
    assert outcomes.count("raised") == 4 == server.faults.failed
    for i in range(8):  # the same ids again: none fails
        out = await server.generate(prompt_ids=ids, sampling_params={"max_tokens": 2}, request_id=f"r{i}")
        assert out.stop_reason == "completed" and out.token_ids


async def test_server_with_faults_in_abort_mode_answers_aborted_with_no_tokens(monkeypatch):
    server = _faulty_server(monkeypatch, "abort")
    ids = server.engine.tokenizer("hi")["input_ids"]
    outs = [await server.generate(prompt_ids=ids, sampling_params={"max_tokens": 2}, request_id=f"r{i}")
            for i in range(8)]
    aborted = [o for o in outs if o.stop_reason == "aborted"]
    assert len(aborted) == 4 and all(o.token_ids == [] and "global_steps" in o.extra_fields for o in aborted)


def test_server_has_no_faults_by_default(server):
    assert server.faults is None
