"""bf16 vs fp32 on this CPU, for the CPU backend's precision choice (`selfemo_verl.cpu.launch.cpu_precision`).

    python benchmarks/bench_cpu_precision.py [--model DIR] [--threads 1]

Measures, for SmolLM2-135M (the demo model; `selfemo_verl.cpu.assets.smollm2_dir()` unless --model):
1. speed: one matmul (512x576 @ 576x1536, the probe behind the AVX2 figure in `selfemo_verl/cpu/launch.py`), the
   actor's forward+backward on [4, 512] tokens and a forward alone (old/ref log-probs), one decode step of the
   rollout server at batch 16 with 300 cached tokens;
   "bf16" is what verl's FSDP2 engine does by default: parameters cast to bf16 (MixedPrecisionPolicy) and the forward
   under torch.autocast(bf16);
2. actor-vs-rollout agreement: 8 requests sampled at T = 1 by the hf server engine (`HFGenerator`) in its dtype, then
   max |p_actor - p_rollout| over their tokens (verl's `training/rollout_probs_diff_max`) with the actor's forward in
   its dtype, for (server, actor) = (fp32, fp32), (fp32, bf16) (the backend before issue 14), (bf16, bf16).
Prints one JSON object with the CPU capability and thread count beside the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time

import torch

from selfemo_verl.cpu import hf_generate
from selfemo_verl.cpu.launch import native_bf16
from selfemo_verl.prompts import recognize_messages

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WINDOW = [{"speaker": "Ross", "text": "We were on a break!"}, {"speaker": "Rachel", "text": "Oh, not this again."},
          {"speaker": "Joey", "text": "How you doin'?"}]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def actor_copy(model, dtype):
    """The actor's forward as verl's FSDP2 engine runs it: params in `dtype`, autocast to `dtype` unless fp32."""
    actor = copy.deepcopy(model).to(dtype)
    ctx = contextlib.nullcontext if dtype == torch.float32 else lambda: torch.autocast("cpu", dtype=dtype)
    return actor, ctx


def speed(model, repeats: int) -> dict:
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    out = {f"matmul_ms_{k}": 1e3 * best_of(lambda: a.to(d) @ b.to(d), repeats * 3) for k, d in DTYPES.items()}
    ids = torch.randint(0, model.config.vocab_size, (4, 512))
    for name, dtype in DTYPES.items():
        actor, ctx = actor_copy(model, dtype)

        def train_step():
            with ctx():
                logits = actor(ids, use_cache=False).logits
            logits.float().logsumexp(-1).mean().backward()
            actor.zero_grad(set_to_none=True)

        def forward():
            with torch.no_grad(), ctx():
                actor(ids, use_cache=False)

        out[f"actor_fwd_bwd_s_{name}"] = best_of(train_step, repeats)
        out[f"actor_fwd_s_{name}"] = best_of(forward, repeats)
        out[f"decode_step_b16_ms_{name}"] = 1e3 * decode_step(copy.deepcopy(model).to(dtype), repeats)
    return out


@torch.no_grad()
def decode_step(model, repeats: int, batch: int = 16, cached: int = 300) -> float:
    past = model(torch.randint(0, 1000, (batch, cached)), use_cache=True).past_key_values
    token = torch.randint(0, 1000, (batch, 1))
    return best_of(lambda: model(token, past_key_values=copy.copy(past), use_cache=True), repeats)


def sampled_requests(model, tokenizer, dtype, n: int = 8, max_tokens: int = 32) -> list[tuple[list, list, list]]:
    """(prompt ids, tokens, log-probs) of `n` requests sampled at T = 1 by the server engine in `dtype`."""
    engine = hf_generate.HFGenerator(copy.deepcopy(model).to(dtype), tokenizer, {tokenizer.eos_token_id}, seed=0)
    s = hf_generate.parse_sampling({"temperature": 1.0, "max_tokens": max_tokens, "logprobs": True}, max_tokens, 4096)
    out = []
    for i in range(n):
        window = WINDOW[i % 3:] + WINDOW[: i % 3]
        prompt = tokenizer.apply_chat_template(recognize_messages(window, "meld"), tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gen = engine.generate(ids, s)
        out.append((ids, gen.token_ids, gen.log_probs))
    return out


@torch.no_grad()
def probs_diff_max(model, dtype, requests) -> float:
    """max |exp(actor log-prob) - exp(rollout log-prob)| over every request's tokens (verl's metric)."""
    actor, ctx = actor_copy(model, dtype)
    worst = 0.0
    for ids, tokens, logprobs in requests:
        with ctx():
            logits = actor(torch.tensor([ids + tokens]), use_cache=False).logits
        lp = torch.log_softmax(logits[0, len(ids) - 1 : -1].float(), -1).gather(-1, torch.tensor(tokens)[:, None])
        worst = max(worst, float((lp.squeeze(-1).exp() - torch.tensor(logprobs).exp()).abs().max()))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfemo_verl.cpu.assets import smollm2_dir

    torch.set_num_threads(args.threads)
    path = args.model or str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
              "threads": torch.get_num_threads(), "model": path}
    result.update({k: round(v, 4) for k, v in speed(model, args.repeats).items()})
    for server, actor in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
        torch.manual_seed(0)
        requests = sampled_requests(model, tokenizer, DTYPES[server])
        result[f"probs_diff_max_server_{server}_actor_{actor}"] = probs_diff_max(model, DTYPES[actor], requests)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
