"""Prime the tiny random Qwen3 on the answer format, so a CPU run's episodes differ inside a group.

A random model never writes `<emotion>…</emotion>`: every episode scores r_invalid, every group has zero
variance, every advantage is 0 and the policy-gradient path of SELF-GRPO is never exercised. A few hundred
steps of plain supervised next-token training (loss on the assistant answers only) on synthetic self-play
transcripts teach the format:

    recognize prompt  -> <emotion>L</emotion>
    role switch       -> <emotion>E</emotion><reply>…</reply>

with the real prompts of `selfemo_verl.prompts` and the tokenizer the model ships with. The labels are drawn at
random (a fixed, seeded draw), so the model learns the format but not the task: sampled at temperature 1 its
answers name different labels, sometimes the gold one, and sometimes still break the format. That spread is
what GRPO needs; no learning of emotions is claimed. Pure torch + transformers (no verl); `assets.py` caches
the result like the other assets.
"""

from __future__ import annotations

import random

import torch

from selfemo_verl.cpu.assets import SPEAKERS, UTTERANCES
from selfemo_verl.labels import LABEL_SPACES, format_emotions
from selfemo_verl.prompts import recognize_messages, role_switch_message

PRIME = dict(  # the priming recipe (part of the cached directory's hash)
    transcripts=512, steps=250, batch_size=8, lr=3e-3, weight_decay=0.0, seed=0,
    two_label_share=0.25, max_turns=3,
)
REPLIES = tuple(u for u in UTTERANCES if len(u) <= 24)  # short: the smoke recipe gives the responder 32 tokens


def _labels(rng: random.Random, space: str, two_label_share: float) -> list[str]:
    k = 2 if rng.random() < two_label_share else 1
    return rng.sample(LABEL_SPACES[space], k)


def transcript(rng: random.Random, space: str, two_label_share: float, max_turns: int) -> list[dict]:
    """One synthetic self-play transcript: recognize prompt, answer, role switch, responder answer."""
    window = [{"speaker": rng.choice(SPEAKERS), "text": rng.choice(UTTERANCES)}
              for _ in range(rng.randint(1, max_turns))]
    recognized = format_emotions(_labels(rng, space, two_label_share))
    stated = format_emotions(_labels(rng, space, two_label_share))
    reply = f"{stated}<reply>{rng.choice(REPLIES)}</reply>"
    return [*recognize_messages(window, space), {"role": "assistant", "content": recognized},
            role_switch_message(rng.choice(SPEAKERS), space), {"role": "assistant", "content": reply}]


def transcripts(n: int, seed: int, two_label_share: float, max_turns: int) -> list[list[dict]]:
    """`n` transcripts over the three label spaces in turn (seeded, so the priming is reproducible)."""
    rng = random.Random(seed)
    spaces = sorted(LABEL_SPACES)
    return [transcript(rng, spaces[i % len(spaces)], two_label_share, max_turns) for i in range(n)]


def answer_tokens(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the ChatML rendering of `messages` and a 0/1 mask: 1 on assistant answers and their <|im_end|>.

    The rendering is the chat template's (`<|im_start|>role\\ncontent<|im_end|>\\n` per message), tokenized in one
    piece; a token belongs to an answer when its first character does.
    """
    text, spans = "", []
    for message in messages:
        head = f"<|im_start|>{message['role']}\n"
        body = f"{message['content']}<|im_end|>"
        if message["role"] == "assistant":
            spans.append((len(text) + len(head), len(text) + len(head) + len(body)))
        text += head + body + "\n"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) with labels -100 outside the answers."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, mask) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(row), -100)
    return ids, attention, labels


def prime(model, tokenizer, recipe: dict = PRIME) -> list[float]:
    """Train `model` in place on the answer format (AdamW, constant lr, answer tokens only); returns the losses."""
    data = [answer_tokens(tokenizer, m) for m in transcripts(recipe["transcripts"], recipe["seed"],
                                                             recipe["two_label_share"], recipe["max_turns"])]
    rng = random.Random(recipe["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the result does not depend on the thread count
    try:
        losses = _train(model, data, rng, tokenizer.pad_token_id, recipe)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def _train(model, data, rng: random.Random, pad_id: int, recipe: dict) -> list[float]:
    optim = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    model.train()
    losses = []
    for _ in range(recipe["steps"]):
        ids, attention, labels = _batch(rng.sample(data, recipe["batch_size"]), pad_id)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses
