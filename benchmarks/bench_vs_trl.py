"""Per-step wall time of one GRPO step: TRL's GRPOTrainer vs this project's verl pipeline, side by side in one run.

    .venv/bin/python benchmarks/bench_vs_trl.py [--steps 3] [--arms trl,recognize,selfemo] [--out-dir DIR]

(from the repository root: the recipe, .venv-trl and the default --raw-dir are relative paths)

The same step three ways, on the same `--prompts` MELD train rows per step (a fixed, seeded draw of rows that have a
next turn, written once to OUT/data/<arm>/train.parquet, read in file order), SmolLM2-135M-Instruct in fp32,
`--n` generations per prompt, lr 1e-4, one optimizer step per training step, no KL, gradient checkpointing off:
- `trl`: TRL 1.16.0's GRPOTrainer on recognition only (benchmarks/trl_grpo_step.py, run with .venv-trl/bin/python;
  build it with `python3.11 -m venv .venv-trl && .venv-trl/bin/pip install -r requirements/bench-trl.txt &&
  .venv-trl/bin/pip install --no-deps -e .`);
- `recognize`: verl, recognition only (`selfemo_recognize` agent loop, `algorithm.adv_estimator=grpo`);
- `selfemo`: verl, the SELF-EMO step (`selfemo_self_play` agent loop: recognize + respond + blind judge, `self_grpo`).
Both verl arms run recipes/run_cpu_smoke.sh with the demo's options (recipes/run_cpu_demo.sh: bypass_mode=True, so
no old-log-prob pass; respond 48 / judge 24 tokens) and the overrides listed in the output; all three score the
recognition with `reward_fn.compute_score` (r_rec). Step 1 carries warm-up: the summary is the median of steps 2..N.
Prints one JSON object: per arm the per-step wall times and phases, threads, CPU capability; ratios to TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path

import torch

from selfemo_verl.cpu.hf_rollout import server_threads
from selfemo_verl.cpu.launch import cpu_threads, native_bf16
from selfemo_verl.cpu.watch import run_watched

SPACE = "meld"
AGENTS = {"recognize": "selfemo_recognize", "selfemo": "selfemo_self_play"}
ESTIMATORS = {"recognize": "grpo", "selfemo": "self_grpo"}
TRL_PYTHON = ".venv-trl/bin/python"


def write_rows(raw_dir: str, data_dir: Path, count: int, window: int, seed: int) -> None:
    """DATA/<arm>/{train,val}.parquet: the same `count` MELD train rows with a next turn, each arm's agent loop."""
    from selfemo_verl.data.erc_data import build_rows, read_split, write_splits

    rows = [r for r in build_rows(read_split(SPACE, raw_dir, "train"), SPACE, "train", window)
            if r["extra_info"]["next_speaker"]]
    picked = random.Random(seed).sample(rows, count)
    for arm, agent in AGENTS.items():
        arm_rows = [{**r, "agent_name": agent} for r in picked]
        write_splits({"train": arm_rows, "val": arm_rows}, data_dir / arm)  # val: read by verl, never validated


def median_after_warmup(values: list[float]) -> float | None:
    """Median of steps 2..N (step 1 carries warm-up); the one step when there is only one."""
    rest = values[1:] or values
    return round(statistics.median(rest), 2) if rest else None


def last_json_line(log: Path) -> dict:
    """The last JSON object line of a log (TRL's own log lines are Python dict reprs: `{'loss': ...}`)."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.startswith('{"')]
    return json.loads(lines[-1]) if lines else {}


def run_trl(args, out_dir: Path, model: str) -> dict:
    """trl_grpo_step.py in .venv-trl, watched; its JSON line plus the run's wall time and peak memory."""
    if not Path(TRL_PYTHON).is_file():
        raise FileNotFoundError(f"{TRL_PYTHON} not found: build .venv-trl first (see this script's docstring)")
    cmd = [TRL_PYTHON, "benchmarks/trl_grpo_step.py", "--data", str(out_dir / "data/recognize/train.parquet"),
           "--model", model,
           "--steps", str(args.steps), "--prompts", str(args.prompts), "--n", str(args.n),
           "--micro-batch", str(args.micro_batch), "--max-tokens", str(args.max_tokens), "--lr", str(args.lr),
           "--window", str(args.window), "--seed", str(args.seed), "--threads", str(args.trl_threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    report = run_watched(cmd, env=env, log_path=str(out_dir / "trl.log"), timeout_s=args.timeout_s)
    result = last_json_line(out_dir / "trl.log")
    return {**result, "command": " ".join(cmd), "returncode": report.returncode,
            "total_wall_s": round(report.wall_s, 1), "peak_pss_gib": round(report.peak_pss_gib, 2)}


def verl_overrides(arm: str, args) -> list[str]:
    """The hydra overrides of a verl arm on top of recipes/run_cpu_smoke.sh (the demo's options, the bench sizes)."""
    return [
        f"algorithm.adv_estimator={ESTIMATORS[arm]}",
        "algorithm.rollout_correction.bypass_mode=True",  # the demo's on-policy update: no old-log-prob pass
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "data.shuffle=False",
        f"data.train_batch_size={args.prompts}",
        f"actor_rollout_ref.rollout.n={args.n}",
        f"actor_rollout_ref.actor.optim.lr={args.lr}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",  # one mini-batch: one optimizer step
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={args.micro_batch}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={args.micro_batch}",
        f"selfemo.agent.window={args.window}",
        f"selfemo.agent.max_tokens.recognize={args.max_tokens}",
        "selfemo.agent.max_tokens.respond=48",
        "selfemo.agent.max_tokens.judge=24",
        f"trainer.experiment_name=bench_vs_trl_{arm}",
    ]


def verl_metrics(metrics: Path) -> dict:
    """Per step: every `timing_s/*` phase, the mean response length and the mean score (verl's file logger)."""
    steps = [json.loads(line)["data"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    phases = sorted({k for s in steps for k in s if k.startswith("timing_s/")})
    out = {"step_wall_s": [round(s["timing_s/step"], 2) for s in steps]}
    out["phases_s"] = {k.split("/", 1)[1]: [round(s.get(k, 0.0), 2) for s in steps]
                       for k in phases if k != "timing_s/step"}
    out["response_length_mean"] = [round(s.get("response_length/mean", 0.0), 1) for s in steps]
    out["score_mean"] = [round(s.get("critic/score/mean", 0.0), 3) for s in steps]
    return out


def run_verl(arm: str, args, out_dir: Path, model: str) -> dict:
    run_dir = out_dir / arm
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT_DIR": str(run_dir), "STEPS": str(args.steps), "MODEL_PATH": model,
           "DATA_DIR": str(out_dir / "data" / arm), "WINDOW": str(args.window)}
    overrides = verl_overrides(arm, args)
    cmd = ["bash", "recipes/run_cpu_smoke.sh", *overrides]
    report = run_watched(cmd, env=env, log_path=str(run_dir / "run.log"), timeout_s=args.timeout_s)
    return {**verl_metrics(run_dir / "metrics.jsonl"), "overrides": overrides,
            "command": f"OUT_DIR={run_dir} STEPS={args.steps} MODEL_PATH={model} DATA_DIR={env['DATA_DIR']} "
                       + " ".join(cmd),
            "returncode": report.returncode, "total_wall_s": round(report.wall_s, 1),
            "peak_pss_gib": round(report.peak_pss_gib, 2), "leftover_processes": report.leftovers}


def verl_side() -> dict:
    """What the verl runs compute with: the actor's OMP_NUM_THREADS (launch.cpu_env) and the hf server's threads."""
    return {"omp_num_threads": cpu_threads(), "hf_server_threads": server_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(),
            "torch": torch.__version__}


def add_summary(result: dict) -> None:
    """Median of steps 2..N per arm, and the ratios of the verl arms' medians to TRL's."""
    medians = {arm: median_after_warmup(result[arm].get("step_wall_s", [])) for arm in result["arms"]}
    result["median_step_s_after_warmup"] = medians
    trl = medians.get("trl")
    for arm in ("recognize", "selfemo"):
        if trl and medians.get(arm):
            result[f"ratio_{arm}_over_trl"] = round(medians[arm] / trl, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="trl,recognize,selfemo", help="comma-separated, run in this order")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (verl data.train_batch_size)")
    parser.add_argument("--n", type=int, default=4, help="generations per prompt")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward")
    parser.add_argument("--max-tokens", type=int, default=24, help="the recognizer's new tokens")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="the draw of the MELD rows")
    parser.add_argument("--trl-threads", type=int, default=len(os.sched_getaffinity(0)), help="TRL's torch threads")
    parser.add_argument("--model", default=None, help="HF model dir (default: the SmolLM2 demo asset)")
    parser.add_argument("--raw-dir", default="../shared/data/meld")
    parser.add_argument("--out-dir", default="outputs/bench_vs_trl")
    parser.add_argument("--timeout-s", type=float, default=3600, help="per run")
    args = parser.parse_args(argv)
    from selfemo_verl.cpu.assets import smollm2_dir

    out_dir = Path(args.out_dir).resolve()
    model = args.model or str(smollm2_dir())
    write_rows(args.raw_dir, out_dir / "data", args.prompts * args.steps, args.window, args.seed)
    result = {"model": model, "dtype": "float32", "steps": args.steps, "prompts": args.prompts, "n": args.n,
              "micro_batch": args.micro_batch, "max_tokens_recognize": args.max_tokens, "lr": args.lr,
              "cores": len(os.sched_getaffinity(0)), "verl_side": verl_side(), "arms": args.arms.split(",")}
    for arm in result["arms"]:
        result[arm] = run_trl(args, out_dir, model) if arm == "trl" else run_verl(arm, args, out_dir, model)
        print(json.dumps({arm: result[arm].get("step_wall_s")}), flush=True)  # progress, before the full JSON
    add_summary(result)
    print(json.dumps(result, indent=1))
    return 0 if all(result[arm]["returncode"] == 0 for arm in result["arms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
