"""selfemo_verl.cpu.hf_generate: the hf rollout's generation engine (no Ray) against transformers."""

import math

import pytest
import torch

from selfemo_verl.cpu import hf_generate
from selfemo_verl.cpu.assets import tiny_model_dir


# ---------------- hf generation engine (no Ray) ----------------


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf_generate.HFGenerator(model, tok, {tok.eos_token_id}, seed=0)


def _prompt(engine):
    return engine.tokenizer("<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def test_greedy_generation_matches_transformers_generate(engine):
    ids = _prompt(engine)
    s = hf_generate.parse_sampling({"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}, 16, 100)
    ours = engine.generate(ids, s).token_ids
    x = torch.tensor([ids])
    ref = engine.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, min_new_tokens=12,
                                do_sample=False)[0, len(ids):].tolist()
    assert ours == ref


def test_logprobs_equal_a_full_forward_at_the_sampling_temperature(engine):
    ids = _prompt(engine)
    s = hf_generate.parse_sampling({"temperature": 0.7, "top_k": 50, "max_tokens": 10, "logprobs": True}, 16, 100)
    out = engine.generate(ids, s)
    assert len(out.log_probs) == len(out.token_ids) >= 1
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1 : -1] / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(out.log_probs), ref, atol=1e-4)


def test_no_logprobs_unless_asked(engine):
    s = hf_generate.parse_sampling({"max_tokens": 3, "logprobs": False}, 16, 100)
    assert engine.generate(_prompt(engine), s).log_probs is None
    assert hf_generate.parse_sampling({"logprobs": 0}, 16, 100).logprobs  # vLLM's "sampled token only"


def test_stop_token_ids_and_max_tokens_end_generation(engine):
    ids = _prompt(engine)
    free = engine.generate(ids, hf_generate.parse_sampling({"temperature": 0, "max_tokens": 8, "ignore_eos": True}, 16, 100))
    assert len(free.token_ids) == 8
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    s = hf_generate.parse_sampling({"temperature": 0, "max_tokens": 8, "stop_token_ids": [stop_at], "ignore_eos": True},
                                   16, 100)
    assert engine.generate(ids, s).token_ids == free.token_ids[: first + 1]


def test_stop_string_ends_generation_at_the_token_completing_it(engine):
    ids = _prompt(engine)
    free = engine.generate(ids, hf_generate.parse_sampling({"temperature": 0, "max_tokens": 8, "ignore_eos": True}, 16, 100))
    stop = engine.tokenizer.decode(free.token_ids[2:4])
    out = engine.generate(ids, hf_generate.parse_sampling(
        {"temperature": 0, "max_tokens": 8, "stop": [stop], "ignore_eos": True}, 16, 100))
    assert stop in engine.tokenizer.decode(out.token_ids) and len(out.token_ids) <= 4


def test_max_tokens_is_clamped_to_the_context_room():
    assert hf_generate.parse_sampling({"max_tokens": 500}, 16, 20).max_tokens == 20
    assert hf_generate.parse_sampling({}, 16, 20).max_tokens == 16
    assert hf_generate.parse_sampling({"max_new_tokens": 0}, 16, 20).max_tokens == 16


def test_top_k_one_is_greedy_and_top_p_keeps_the_crossing_token():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    kept = torch.isfinite(hf_generate.truncate_top_k_top_p(logits, top_k=1, top_p=1.0))
    assert kept.tolist() == [False, True, False, False]
    probs = torch.softmax(logits, -1)  # sorted: 0.64, 0.24, 0.09, 0.03
    kept = torch.isfinite(hf_generate.truncate_top_k_top_p(logits, top_k=-1, top_p=0.7))
    assert kept.tolist() == [False, True, True, False] and probs[1] < 0.7


def test_sampling_is_seeded_and_follows_temperature(engine):
    ids = _prompt(engine)
    s = hf_generate.parse_sampling({"temperature": 1.0, "max_tokens": 6}, 16, 100)
    engine.generator.manual_seed(1)
    a = engine.generate(ids, s).token_ids
    engine.generator.manual_seed(1)
    assert engine.generate(ids, s).token_ids == a


def test_weight_load_counts_every_tensor_and_changes_generation(engine):
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    ids = _prompt(engine)
    greedy = hf_generate.parse_sampling({"temperature": 0, "max_tokens": 6, "ignore_eos": True}, 16, 100)
    before = engine.generate(ids, greedy).token_ids
    perturbed = [(k, v + 0.5 * torch.randn_like(v)) for k, v in state.items()]
    stats = engine.load_weights(perturbed)
    assert stats["loaded"] == stats["received"] == stats["model_tensors"] == len(state)
    assert stats["missing"] == stats["unexpected"] == stats["mismatched"] == 0
    assert engine.generate(ids, greedy).token_ids != before
    dropped = "model.layers.0.mlp.up_proj.weight"  # not tied to anything
    stats = engine.load_weights([(k, v) for k, v in state.items() if k != dropped] + [("bogus.weight", torch.zeros(1))])
    assert (stats["missing"], stats["unexpected"]) == (1, 1)
    engine.load_weights(list(state.items()))  # restore
    assert engine.generate(ids, greedy).token_ids == before


def test_weight_sync_measures_the_norm_and_the_distance_from_the_previous_weights(engine):
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in state.values()))
    same = engine.load_weights(list(state.items()))
    assert same["delta_norm"] == 0.0 and same["norm"] == pytest.approx(norm, rel=1e-12)
    name = "model.layers.0.mlp.up_proj.weight"
    step = torch.full_like(state[name], 0.01)
    moved = engine.load_weights([(k, v + step if k == name else v) for k, v in state.items()])
    # reason: only one tensor moved, by 0.01 per element: ‖Δw‖ = 0.01 * sqrt(numel)
    assert moved["delta_norm"] == pytest.approx(0.01 * math.sqrt(step.numel()), rel=1e-5)
    back = engine.load_weights(list(state.items()))  # restore; the distance is measured from the moved weights
    assert back["delta_norm"] == pytest.approx(moved["delta_norm"], rel=1e-6) and back["norm"] == same["norm"]


def test_weight_load_reports_shape_mismatch_without_loading(engine):
    name, tensor = next(iter(engine.model.state_dict().items()))
    stats = engine.load_weights([(name, torch.zeros(tensor.numel() + 1))])
    assert stats["mismatched"] == 1 and stats["loaded"] == 0 and math.isfinite(float(tensor.float().sum()))
