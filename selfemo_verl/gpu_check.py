"""The first GPU minutes: SELF-GRPO and group consistency on CUDA tensors against the CPU result.

    bash recipes/gpu_check.sh                      # = python -m selfemo_verl.gpu_check --torch-only
    python -m selfemo_verl.gpu_check --torch-only --out gpu_check.json [--device cuda]

Needs torch only (no verl, no vLLM, no network, no model hub), so it runs on a bare GPU node before anything
else is installed. On a machine without CUDA it stops with one line and exit status 2.

What it checks, on a seeded batch shaped like a training step (groups of 1..8 episodes, random response
lengths, some parse failures and infrastructure failures):
1. group consistency c_i (`rewards.group_consistency_from_masks`, numpy) fed to the estimator as a device tensor
   and as a numpy array give the same advantages;
2. `advantage.self_grpo_advantage` on `device` equals the CPU result for fp32 and bf16 token rewards
   (group moments run in float64 on both; tolerance: 1e-6 fp32, one bf16 rounding step for bf16);
3. `advantage.self_grpo_stats` are equal on both.
It writes a JSON report (device name, torch version, each check's max abs difference, pass/fail) and exits 1
when a check fails. The full two-step `python -m selfemo_verl.main` run with vLLM on a GPU is not part of this
script yet (issue 13, part 4).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from selfemo_verl.advantage import SELF_GRPO_DEFAULTS, self_grpo_advantage, self_grpo_stats
from selfemo_verl.rewards import group_consistency_from_masks

KNOBS = asdict(SELF_GRPO_DEFAULTS)  # the recipe's knobs (selfemo_trainer.yaml's algorithm.self_grpo)
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2**-7}  # bf16: 8 significant bits -> |A| <= 3 rounds by <= 2^-7


def step_batch(seed: int = 0, n_groups: int = 64, length: int = 48) -> dict:
    """A seeded batch like one SELF-GRPO step: rewards (bs, L), mask (bs, L), uids, pred masks, voters, members.

    >>> b = step_batch(0)
    >>> b["rewards"].shape == b["mask"].shape, len(b["uids"]) == len(b["member"]) == len(b["voters"])
    (True, True)
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_groups)
    uids = np.array([f"uid{g}" for g, size in enumerate(sizes) for _ in range(size)], dtype=object)
    bs = len(uids)
    lengths = rng.integers(1, length + 1, bs)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    rewards = np.zeros((bs, length), dtype=np.float32)
    rewards[np.arange(bs), lengths - 1] = rng.choice([0.0, 0.048, 0.524, 1.0, 1.25, 1.75], bs)
    parsed, infra = rng.random(bs) < 0.8, rng.random(bs) < 0.1
    masks = np.where(parsed, rng.integers(1, 2**7, bs), 0)
    return dict(rewards=rewards, mask=mask, uids=uids, masks=masks, voters=parsed & ~infra, member=~infra)


def _advantages(batch: dict, device: str, dtype: torch.dtype, consistency) -> torch.Tensor:
    rewards = torch.as_tensor(batch["rewards"]).to(device, dtype)
    mask = torch.as_tensor(batch["mask"]).to(device)
    member = torch.as_tensor(batch["member"]).to(device)
    advantages, _ = self_grpo_advantage(rewards, mask, batch["uids"], consistency, member, **KNOBS)
    if advantages.device != rewards.device or advantages.dtype != dtype:
        raise RuntimeError(f"self_grpo_advantage returned {advantages.dtype} on {advantages.device} for {dtype} "
                           f"rewards on {rewards.device}")
    return advantages.float().cpu()


def torch_checks(device: str, seed: int = 0) -> list[dict]:
    """Each check as {name, max_abs_diff, tolerance, passed}: `device` against the CPU on one seeded batch."""
    batch = step_batch(seed)
    c = group_consistency_from_masks(batch["masks"], batch["voters"], batch["uids"], 7)
    c_device = torch.as_tensor(c).to(device)
    checks = []
    for dtype, tol in TOLERANCE.items():
        cpu = _advantages(batch, "cpu", dtype, c)
        for name, consistency in (("numpy", c), ("device tensor", c_device)):
            got = _advantages(batch, device, dtype, consistency)
            diff = float((got - cpu).abs().max())
            checks.append(dict(name=f"self_grpo_advantage {str(dtype)[6:]}, consistency as {name}",
                               max_abs_diff=diff, tolerance=tol, passed=diff <= tol))
    scores = torch.as_tensor(batch["rewards"]).sum(-1)
    cpu_stats = self_grpo_stats(scores, batch["uids"], c, batch["member"], **KNOBS)
    dev_stats = self_grpo_stats(scores.to(device), batch["uids"], c_device, torch.as_tensor(batch["member"]).to(device),
                                **KNOBS)
    diff = max(abs(cpu_stats[k] - dev_stats[k]) for k in cpu_stats)
    checks.append(dict(name="self_grpo_stats", max_abs_diff=diff, tolerance=1e-12, passed=diff <= 1e-12))
    return checks


def report(device: str, checks: list[dict]) -> dict:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__, "checks": checks,
            "passed": all(check["passed"] for check in checks)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--torch-only", action="store_true", required=True,
                        help="the checks that need torch only (the full vLLM run is not written yet)")
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU (default: cuda)")
    parser.add_argument("--out", default="gpu_check.json", help="JSON report path")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "run it on a GPU node", file=sys.stderr)
        return 2
    result = report(args.device, torch_checks(args.device))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for check in result["checks"]:
        print(f"{'ok  ' if check['passed'] else 'FAIL'} {check['name']}: max |diff| {check['max_abs_diff']:.3g}")
    print(f"gpu_check: {'passed' if result['passed'] else 'FAILED'} on {result['device_name']}; report {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
