"""Wall time of SELF-GRPO vs verl 0.9.1's `grpo_vectorized` and `grpo` advantage estimators, on CPU.

Same process, same inputs (B samples x L tokens, groups of G, uuid uids, int64 response mask as verl's v1
trainer builds it), interleaved runs, median of R. Prints medians (and minima, less sensitive to
other load on the machine) and their ratios to `grpo_vectorized`.

    python benchmarks/bench_advantage.py [--samples 16384] [--tokens 1024] [--group 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import numpy as np
import torch

from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_grpo_vectorized_outcome_advantage

from selfemo_verl.advantage import self_grpo_advantage


def make_inputs(samples: int, tokens: int, group: int, seed: int = 0):
    """Outcome rewards at the last valid token, random lengths, uuid4 uids repeated `group` times."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tokens + 1, (samples,), generator=g)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).to(torch.int64)
    rewards = torch.zeros(samples, tokens)
    rewards[torch.arange(samples), lengths - 1] = torch.rand(samples, generator=g)
    uids = np.array([str(uuid.uuid4()) for _ in range(samples // group) for _ in range(group)], dtype=object)
    consistency = torch.rand(samples, generator=g).numpy()
    return rewards, mask, uids, consistency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rewards, mask, uids, consistency = make_inputs(args.samples, args.tokens, args.group)
    runs = {
        "self_grpo": lambda: self_grpo_advantage(rewards, mask, uids, consistency),
        "grpo_vectorized": lambda: compute_grpo_vectorized_outcome_advantage(rewards, mask, uids),
        "grpo": lambda: compute_grpo_outcome_advantage(rewards, mask, uids),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["grpo_vectorized"])
    base_min = min(times["grpo_vectorized"])
    print(f"{args.samples} samples x {args.tokens} tokens, group {args.group}, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}")
    for name, values in times.items():
        med, best = statistics.median(values), min(values)
        print(f"{name:16s} median {med * 1e3:8.1f} ms ({med / base:5.2f}x grpo_vectorized)   "
              f"min {best * 1e3:8.1f} ms ({best / base_min:5.2f}x)")


if __name__ == "__main__":
    main()
