"""The hf rollout's generation phase, one request at a time vs continuously batched, vs plain batched HF generate.

    python benchmarks/bench_hf_batching.py [--threads 1,2] [--prompts 4] [--n 4] [--model DIR] [--raw-dir DIR]

A SmolLM2 demo-like generation phase (recipes/run_cpu_demo.sh: 4 MELD prompts x 4 episodes, window 4, max_tokens
recognize 24 / respond 48 / judge 24, temperature 1): every episode runs concurrently, each as the self-play loop
does it: recognize on the dialogue window, then respond after the role switch (prompt = window + answer + switch),
then one blind judge on the window + the reply text (always judged here, even when the reply did not parse).
Each request carries its own sampling seed, so both server modes generate the same tokens and the run checks it.

Modes, measured side by side in one process on the same prompts:
- `sequential`: the server before issue 14 (`HFGenerator.generate` under one lock, one request at a time);
- `batched_no_prefix`: continuous batching alone (`BatchScheduler` with its prefix store off);
- `batched`: the server now (`BatchScheduler`: continuous batching, at most `--max-batch` rows, and prompts
  prefilled only past the longest prefix whose KV cache the store holds);
- `hf_generate`: plain `model.generate` (attention "sdpa") on all episodes' prompts of one role at once
  (left-padded, three waves), the ceiling of batched decoding with stock transformers on this machine (its own
  samples: no per-request seeds).
The server modes use the server's model (`hf_generate.load_model`: sdpa with grouped-query heads in the kernel).
Prints one JSON object: per thread count and mode the phase's wall time, generated and prompt tokens, tokens/s and
the speed-up over `sequential`, beside the CPU capability.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import torch

from selfemo_verl.cpu import hf_generate
from selfemo_verl.cpu.hf_batching import PREFIX_CACHE_BYTES, BatchScheduler
from selfemo_verl.cpu.launch import native_bf16
from selfemo_verl.prompts import judge_messages, parse_reply, recognize_messages, role_switch_message

ROLES = {"recognize": 24, "respond": 48, "judge": 24}  # recipes/run_cpu_demo.sh's selfemo.agent.max_tokens
SPACE = "meld"
SERVER_MODES = ("sequential", "batched_no_prefix", "batched")


def meld_windows(raw_dir: str, prompts: int, window: int, seed: int = 0) -> list[tuple[list, str]]:
    """(window, next speaker) of `prompts` MELD train rows that have a next turn (a fixed, seeded draw)."""
    from selfemo_verl.data.erc_data import build_rows, read_split

    rows = [r for r in build_rows(read_split(SPACE, raw_dir, "train"), SPACE, "train", window)
            if r["extra_info"]["next_speaker"]]
    picked = random.Random(seed).sample(rows, prompts)
    return [(r["extra_info"]["window"], r["extra_info"]["next_speaker"]) for r in picked]


def encode(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Phase:
    """Counts what one generation phase asked and got."""

    def __init__(self):
        self.prompt_tokens = self.gen_tokens = self.requests = 0
        self.outputs: dict[tuple[int, str], list[int]] = {}  # (episode, role) -> generated token ids
        self.stats: dict = {}  # the scheduler's take_stats()


async def episode(generate, tokenizer, window: list, speaker: str, seed: int, temperature: float, phase: Phase):
    """recognize -> role switch + respond -> judge, as the self-play loop calls the server."""
    messages = recognize_messages(window, SPACE)
    for k, role in enumerate(ROLES):
        if role == "respond":
            messages = [*messages, {"role": "assistant", "content": text}, role_switch_message(speaker, SPACE)]
        elif role == "judge":
            messages = judge_messages(window, speaker, parse_reply(text)[0] or text, SPACE)
        ids = encode(tokenizer, messages)
        s = hf_generate.parse_sampling({"temperature": temperature, "max_tokens": ROLES[role], "logprobs": True,
                                        "seed": seed * 10 + k}, ROLES[role], 4096)
        out = await generate(ids, s)
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        phase.prompt_tokens += len(ids)
        phase.gen_tokens += len(out.token_ids)
        phase.requests += 1
        phase.outputs[seed, role] = out.token_ids


async def server_phase(mode: str, engine, episodes: list, temperature: float, max_batch: int) -> Phase:
    scheduler = None
    if mode == "sequential":
        lock = asyncio.Lock()

        async def generate(ids, s):
            async with lock:
                return await asyncio.to_thread(engine.generate, ids, s)
    else:
        prefix_bytes = 0 if mode == "batched_no_prefix" else PREFIX_CACHE_BYTES
        scheduler = BatchScheduler(engine, max_batch=max_batch, prefix_cache_bytes=prefix_bytes)
        generate = scheduler.generate
    phase = Phase()
    await asyncio.gather(*[episode(generate, engine.tokenizer, w, sp, i, temperature, phase)
                           for i, (w, sp) in enumerate(episodes)])
    phase.stats = scheduler.take_stats() if scheduler else {}
    return phase


@torch.no_grad()
def hf_generate_phase(model, tokenizer, episodes: list, temperature: float) -> Phase:
    """Three waves of left-padded `model.generate`, one per role, on every episode's prompt."""
    phase, texts = Phase(), [""] * len(episodes)
    tokenizer.padding_side = "left"
    for role, max_tokens in ROLES.items():
        messages = []
        for i, (window, speaker) in enumerate(episodes):
            if role == "recognize":
                messages.append(recognize_messages(window, SPACE))
            elif role == "respond":
                messages.append([*recognize_messages(window, SPACE), {"role": "assistant", "content": texts[i]},
                                 role_switch_message(speaker, SPACE)])
            else:
                messages.append(judge_messages(window, speaker, parse_reply(texts[i])[0] or texts[i], SPACE))
        ids = [encode(tokenizer, m) for m in messages]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=temperature > 0,
                             temperature=temperature or None, top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id)
        for i, row in enumerate(out[:, batch["input_ids"].shape[1]:].tolist()):
            n = next((j + 1 for j, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
            texts[i] = tokenizer.decode(row[:n], skip_special_tokens=True)
            phase.prompt_tokens += len(ids[i])
            phase.gen_tokens += n
            phase.requests += 1
    return phase


def timed(fn):
    start = time.perf_counter()
    phase = fn()
    return phase, time.perf_counter() - start


def report(phase: Phase, wall: float) -> dict:
    out = {"wall_s": round(wall, 2), "requests": phase.requests, "gen_tokens": phase.gen_tokens,
           "prompt_tokens": phase.prompt_tokens, "gen_tokens_per_s": round(phase.gen_tokens / wall, 1)}
    if phase.stats:
        out.update(peak_batch=phase.stats["peak_batch"], decode_steps=phase.stats["decode_steps"],
                   prefix_reused_tokens=phase.stats["prefix_reused_tokens"])
    return out


def run_threads(threads: int, engine, episodes: list, args) -> dict:
    torch.set_num_threads(threads)
    out, phases = {}, {}
    for mode in SERVER_MODES:
        phases[mode], wall = timed(lambda: asyncio.run(server_phase(mode, engine, episodes, args.temperature,
                                                                     args.max_batch)))
        out[mode] = report(phases[mode], wall)
    engine.model.set_attn_implementation("sdpa")  # plain transformers
    phase, wall = timed(lambda: hf_generate_phase(engine.model, engine.tokenizer, episodes, args.temperature))
    engine.model.set_attn_implementation(hf_generate.ATTENTION)
    out["hf_generate"] = report(phase, wall)
    for mode in (*SERVER_MODES[1:], "hf_generate"):
        out[mode]["speedup_vs_sequential"] = round(out["sequential"]["wall_s"] / out[mode]["wall_s"], 2)
    for mode in SERVER_MODES[1:]:
        same = sum(tokens == phases["sequential"].outputs[key] for key, tokens in phases[mode].outputs.items())
        out[mode]["outputs_equal_to_sequential"] = f"{same}/{phases[mode].requests}"
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model dir (default: the SmolLM2 demo asset)")
    parser.add_argument("--raw-dir", default="../shared/data/meld")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="episodes per prompt")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=256)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from selfemo_verl.cpu.assets import smollm2_dir

    path = args.model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = hf_generate.load_model(path, torch.float32)  # as the server loads it
    engine = hf_generate.HFGenerator(model, tokenizer, {tokenizer.eos_token_id}, seed=0)
    episodes = [ep for ep in meld_windows(args.raw_dir, args.prompts, args.window) for _ in range(args.n)]
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
              "model": path, "dtype": "float32", "episodes": len(episodes), "max_tokens": ROLES,
              "temperature": args.temperature}
    for threads in [int(t) for t in args.threads.split(",")]:
        result[f"threads_{threads}"] = run_threads(threads, engine, episodes, args)
        print(json.dumps({f"threads_{threads}": result[f"threads_{threads}"]}), flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
