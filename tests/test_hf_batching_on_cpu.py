"""selfemo_verl.cpu.hf_batching: continuous batching in the hf rollout server equals one-at-a-time decoding.

The reference is `HFGenerator.generate` (one request alone, the server before issue 14). Greedy outputs must match
it token for token and log-probs to 1e-4 (batched matmuls round differently); seeded samples must match too.
"""

import asyncio
import doctest
import importlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfemo_verl.cpu import faults as faults_mod
from selfemo_verl.cpu import hf_generate
from selfemo_verl.cpu.assets import tiny_model_dir
from selfemo_verl.cpu.hf_batching import BatchScheduler

TEXTS = ("How are you?", "We were on a break! I can't believe you did that, honestly.", "hi",
         "Get out of my apartment! " * 4, "Okay.", "Could this be any more awkward? " * 2)


@pytest.fixture(scope="module")
def engine():
    path = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    return hf_generate.HFGenerator(hf_generate.load_model(path, torch.float32), tok, {tok.eos_token_id}, seed=0)


def _ids(engine, text: str) -> list[int]:
    return engine.tokenizer(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def _sampling(**params) -> hf_generate.Sampling:
    return hf_generate.parse_sampling({"logprobs": True, **params}, 16, 1000)


def _one_at_a_time(engine, requests) -> list:
    return [engine.generate(ids, s) for ids, s in requests]


async def _batched(engine, requests, max_batch: int = 64):
    scheduler = BatchScheduler(engine, max_batch=max_batch)
    return await asyncio.gather(*[scheduler.generate(ids, s) for ids, s in requests]), scheduler


def _assert_same(ref, out):
    assert out.token_ids == ref.token_ids and out.stop_reason == ref.stop_reason
    assert (out.log_probs is None) == (ref.log_probs is None)
    if ref.log_probs is not None:
        assert torch.allclose(torch.tensor(out.log_probs), torch.tensor(ref.log_probs), atol=1e-4, rtol=0)


async def test_batched_greedy_equals_one_at_a_time_with_mixed_lengths_and_max_tokens(engine):
    # reason: prompts of different lengths share one left-padded cache; each row keeps its own positions
    requests = [(_ids(engine, t), _sampling(temperature=0, max_tokens=m, ignore_eos=True))
                for t, m in zip(TEXTS, (12, 5, 20, 9, 16, 3))]
    outs, scheduler = await _batched(engine, requests)
    for ref, out in zip(_one_at_a_time(engine, requests), outs):
        _assert_same(ref, out)
    assert [len(o.token_ids) for o in outs] == [12, 5, 20, 9, 16, 3]
    assert scheduler.peak_batch == len(requests) and scheduler.ticks == 20 - 1  # the first token comes from prefill


async def test_a_request_that_finishes_early_leaves_the_others_decoding(engine):
    ids = _ids(engine, TEXTS[1])
    free = engine.generate(ids, _sampling(temperature=0, max_tokens=10, ignore_eos=True)).token_ids
    requests = [
        (ids, _sampling(temperature=0, max_tokens=1)),  # done at prefill: never joins the batch
        (ids, _sampling(temperature=0, max_tokens=10, stop_token_ids=[free[2]], ignore_eos=True)),  # stop id
        (ids, _sampling(temperature=0, max_tokens=10, stop=[engine.tokenizer.decode(free[3:5])], ignore_eos=True)),
        (_ids(engine, TEXTS[3]), _sampling(temperature=0, max_tokens=14, ignore_eos=True)),
        (_ids(engine, TEXTS[0]), _sampling(temperature=0, max_tokens=14)),  # may stop at eos
    ]
    outs, _ = await _batched(engine, requests)
    for ref, out in zip(_one_at_a_time(engine, requests), outs):
        _assert_same(ref, out)
    assert len(outs[0].token_ids) == 1 and outs[1].token_ids == free[: free.index(free[2]) + 1]
    assert len(outs[2].token_ids) <= 5 and len(outs[3].token_ids) == 14


async def test_a_request_arriving_mid_batch_joins_and_matches_one_at_a_time(engine):
    # reason: the late prompt is longer than the running rows' columns, so the running rows get left-padded
    short = (_ids(engine, TEXTS[2]), _sampling(temperature=0, max_tokens=24, ignore_eos=True))
    long = (_ids(engine, TEXTS[3] * 2), _sampling(temperature=0, max_tokens=6, ignore_eos=True))
    scheduler = BatchScheduler(engine, max_batch=8)
    first = asyncio.ensure_future(scheduler.generate(*short))
    while scheduler.ticks < 3:
        await asyncio.sleep(0.001)
    assert len(long[0]) > len(short[0]) + 3
    late = await scheduler.generate(*long)
    early = await first
    assert scheduler.peak_batch == 2
    for ref, out in zip(_one_at_a_time(engine, [short, long]), [early, late]):
        _assert_same(ref, out)


async def test_max_batch_caps_the_running_rows_and_queues_the_rest(engine):
    requests = [(_ids(engine, t), _sampling(temperature=0, max_tokens=6, ignore_eos=True)) for t in TEXTS]
    outs, scheduler = await _batched(engine, requests, max_batch=2)
    assert scheduler.peak_batch == 2
    for ref, out in zip(_one_at_a_time(engine, requests), outs):
        _assert_same(ref, out)


async def test_seeded_samples_do_not_depend_on_the_requests_around_them(engine):
    requests = [(_ids(engine, t), _sampling(temperature=1.0, top_k=50, top_p=0.9, max_tokens=10, seed=100 + i))
                for i, t in enumerate(TEXTS)]
    outs, _ = await _batched(engine, requests)
    for ref, out in zip(_one_at_a_time(engine, requests), outs):
        _assert_same(ref, out)
    again, _ = await _batched(engine, requests[::-1])  # another order, other neighbours
    assert [o.token_ids for o in again[::-1]] == [o.token_ids for o in outs]


async def test_logprobs_only_for_requests_that_ask(engine):
    requests = [(_ids(engine, TEXTS[0]), hf_generate.parse_sampling({"max_tokens": 4, "logprobs": False}, 16, 99)),
                (_ids(engine, TEXTS[1]), _sampling(max_tokens=4))]
    outs, _ = await _batched(engine, requests)
    assert outs[0].log_probs is None and len(outs[1].log_probs) == len(outs[1].token_ids)


async def test_a_bad_prompt_fails_only_its_own_caller(engine):
    bad = [len(engine.tokenizer) + 10**6]  # no such embedding row
    good = (_ids(engine, TEXTS[0]), _sampling(temperature=0, max_tokens=5, ignore_eos=True))
    scheduler = BatchScheduler(engine, max_batch=8)
    outs = await asyncio.gather(scheduler.generate(bad, _sampling(max_tokens=3)), scheduler.generate(*good),
                                return_exceptions=True)
    assert isinstance(outs[0], IndexError)
    _assert_same(engine.generate(*good), outs[1])


async def test_abort_ends_running_and_waiting_requests_with_aborted(engine):
    scheduler = BatchScheduler(engine, max_batch=2)
    s = _sampling(temperature=0, max_tokens=200, ignore_eos=True)
    calls = [asyncio.ensure_future(scheduler.generate(_ids(engine, t), s)) for t in TEXTS[:3]]
    while scheduler.ticks < 2:
        await asyncio.sleep(0.001)
    engine.aborted = True
    try:
        outs = await asyncio.gather(*calls)
    finally:
        engine.aborted = False
    assert all(o.stop_reason == "aborted" for o in outs)
    assert all(1 <= len(o.token_ids) < 200 for o in outs[:2]) and outs[2].token_ids == []  # the third was waiting
    out = await scheduler.generate(_ids(engine, TEXTS[0]), _sampling(max_tokens=3, ignore_eos=True))
    assert out.stop_reason == "completed" and len(out.token_ids) == 3


# ---------------- prefix store: prompts reuse the KV cache of their longest stored prefix ----------------


async def test_a_group_sharing_one_prompt_prefills_it_once_and_matches_one_at_a_time(engine):
    # reason: the n episodes of a GRPO group send the same recognize prompt at once
    ids = _ids(engine, TEXTS[3])
    requests = [(ids, _sampling(temperature=1.0, max_tokens=8, seed=i)) for i in range(4)]
    outs, scheduler = await _batched(engine, requests)
    for ref, out in zip(_one_at_a_time(engine, requests), outs):
        _assert_same(ref, out)
    assert scheduler.take_stats()["prefix_reused_tokens"] == 3 * (len(ids) - 1)  # all but the last token, 3 times


async def test_the_next_turn_reuses_the_previous_prompt_and_answer(engine):
    # reason: a respond prompt is the recognize prompt + its answer + the role switch
    first = (_ids(engine, TEXTS[1]), _sampling(temperature=0, max_tokens=6, ignore_eos=True))
    scheduler = BatchScheduler(engine, max_batch=8)
    answer = await scheduler.generate(*first)
    follow = first[0] + answer.token_ids + _ids(engine, "Now reply as Ross.")
    scheduler.take_stats()
    out = await scheduler.generate(follow, _sampling(temperature=0, max_tokens=6, ignore_eos=True))
    # the answer's last token was sampled but never fed, so its KV is not stored
    assert scheduler.take_stats()["prefix_reused_tokens"] == len(first[0]) + len(answer.token_ids) - 1
    _assert_same(engine.generate(follow, _sampling(temperature=0, max_tokens=6, ignore_eos=True)), out)


def test_prefix_store_keeps_the_longest_entries_within_its_budget():
    from selfemo_verl.cpu.hf_batching import PrefixStore

    def layers(n):  # one layer, batch 1, 1 head, n tokens, dim 1: 8 bytes per token (keys + values)
        return [(torch.arange(n, dtype=torch.float32).view(1, 1, n, 1),) * 2]

    store = PrefixStore(max_bytes=8 * 10)
    store.add([1, 2, 3], layers(3))
    store.add([1, 2, 3, 4, 5], layers(5))  # covers [1, 2, 3]: replaces it
    assert list(store.entries) == [(1, 2, 3, 4, 5)] and store.bytes == 40
    n, past = store.lookup([1, 2, 3, 9, 9])
    assert n == 3 and past[0][0].shape == (1, 1, 3, 1)
    assert store.lookup([1, 2, 3, 4, 5])[0] == 4  # the last prompt token is always computed
    assert store.lookup([7, 1, 2]) == (0, None)
    store.add([6, 6, 6, 6], layers(4))
    store.add([8, 8, 8], layers(3))  # 12 tokens > 10: the least recently used entry goes
    assert list(store.entries) == [(6, 6, 6, 6), (8, 8, 8)] and store.bytes == 56
    store.add(list(range(11)), layers(11))  # larger than the whole budget: not kept
    assert (10,) not in store.entries and len(store.entries) == 2
    store.clear()
    assert not store.entries and store.bytes == 0


def test_server_attention_equals_transformers_sdpa_under_a_padding_mask(engine):
    # reason: the tiny Qwen3 has 4 query heads over 2 KV heads, so the grouped-query path is exercised
    stock = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32, attn_implementation="sdpa")
    assert engine.model.config._attn_implementation == hf_generate.ATTENTION
    assert engine.model.config.num_attention_heads > engine.model.config.num_key_value_heads
    ids = torch.randint(0, engine.model.config.vocab_size, (3, 20))
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :15] = 0, 0
    with torch.no_grad():
        ours, ref = engine.model(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    assert torch.allclose(ours[mask.bool()], ref[mask.bool()], atol=1e-6, rtol=0)


def test_max_batch_must_be_positive(engine):
    with pytest.raises(ValueError, match="max_batch=0"):
        BatchScheduler(engine, max_batch=0)


# ---------------- through the server: concurrency, fault injection ----------------


def _server(monkeypatch, share: str = ""):
    from verl.workers.config import HFModelConfig, RolloutConfig

    from selfemo_verl.cpu.hf_rollout import HFRolloutServerImpl

    monkeypatch.setenv(faults_mod.SHARE_ENV, share)
    monkeypatch.setenv("SELFEMO_HF_THREADS", "1")
    rollout = RolloutConfig(name="hf", prompt_length=256, response_length=16, dtype="float32")
    return HFRolloutServerImpl(config=rollout, model_config=HFModelConfig(path=str(tiny_model_dir())))


async def test_server_serves_concurrent_callers_in_one_batch_each_with_its_own_output(monkeypatch):
    server = _server(monkeypatch)
    params = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True, "logprobs": True}
    prompts = [_ids(server.engine, t) for t in TEXTS]
    outs = await asyncio.gather(*[server.generate(prompt_ids=p, sampling_params=dict(params), request_id=f"r{i}")
                                  for i, p in enumerate(prompts)])
    assert server.scheduler.peak_batch == len(TEXTS)
    for prompt, out in zip(prompts, outs):
        ref = server.engine.generate(prompt, hf_generate.parse_sampling(params, 16, 1000))
        assert out.token_ids == ref.token_ids and out.stop_reason == "completed"
        assert torch.allclose(torch.tensor(out.log_probs), torch.tensor(ref.log_probs), atol=1e-4, rtol=0)


async def test_server_faults_apply_per_request_while_the_rest_batch(monkeypatch):
    server = _server(monkeypatch, share="0.5")
    params = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}
    prompts = [_ids(server.engine, TEXTS[i % len(TEXTS)]) for i in range(8)]
    outs = await asyncio.gather(*[server.generate(prompt_ids=p, sampling_params=dict(params), request_id=f"r{i}")
                                  for i, p in enumerate(prompts)], return_exceptions=True)
    raised = [o for o in outs if isinstance(o, faults_mod.InjectedServerError)]
    served = [(p, o) for p, o in zip(prompts, outs) if not isinstance(o, Exception)]
    assert len(raised) == 4 == server.faults.failed and len(served) == 4
    for prompt, out in served:  # the injected failures do not disturb the requests batched beside them
        assert out.token_ids == server.engine.generate(prompt, hf_generate.parse_sampling(params, 16, 99)).token_ids


async def test_server_weight_sync_clears_the_prefix_store(monkeypatch):
    # reason: KV computed with the old weights must never seed a prompt after the weights change
    server = _server(monkeypatch)
    params = {"temperature": 0.0, "max_tokens": 5, "ignore_eos": True}
    prompt = _ids(server.engine, TEXTS[1])
    await server.generate(prompt_ids=prompt, sampling_params=dict(params), request_id="a")
    assert server.scheduler.batch.store.entries
    state = {k: v.clone() for k, v in server.engine.model.state_dict().items()}
    moved = [(k, v + 0.3 * torch.randn_like(v)) for k, v in state.items()]
    stats = await server.update_weights(moved, global_steps=1)
    assert stats["generation"]["requests"] == 1 and not server.scheduler.batch.store.entries
    out = await server.generate(prompt_ids=prompt, sampling_params=dict(params), request_id="b")
    assert out.token_ids == server.engine.generate(prompt, hf_generate.parse_sampling(params, 16, 99)).token_ids
    await server.generate(prompt_ids=prompt, sampling_params=dict(params), request_id="c")
    await server.clear_kv_cache()
    assert not server.scheduler.batch.store.entries


@pytest.mark.parametrize("module", ["selfemo_verl.cpu.hf_generate", "selfemo_verl.cpu.hf_batching"])
def test_docstring_examples_hold(module):
    failures, tried = doctest.testmod(importlib.import_module(module))
    assert tried > 0 and failures == 0
