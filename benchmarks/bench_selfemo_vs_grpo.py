"""Per-step wall time of SELF-EMO vs stock verl GRPO on CPU: same tiny model, same MELD rows, same batch, one run.

    python benchmarks/bench_selfemo_vs_grpo.py [--steps 4] [--out-dir outputs/bench_selfemo_vs_grpo]

Both arms run recipes/run_cpu_smoke.sh (the real verl trainer through the CPU backend) on the same MELD parquet:
- SELF-EMO: `selfemo_self_play` agent loop (recognize + respond + blind judge), SELF-GRPO with group consistency;
- stock:    verl's `single_turn_agent` loop (the parquet's agent_name column rewritten), verl's built-in `grpo`,
            the same reward function scoring the single answer, answer budget = the smoke's recognize budget.
Step 1 includes warm-up, so the ratio uses the median of steps 2..N. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfemo_verl.cpu.watch import run_watched

REPO = Path(__file__).resolve().parents[1]


def prepare(data_dir: Path) -> Path:
    """MELD parquet (window 4, like the smoke) plus a copy whose rows use verl's single-turn agent loop."""
    if not (data_dir / "train.parquet").is_file():
        subprocess.run([sys.executable, "data_prep/prepare_erc.py", "--dataset", "meld", "--raw-dir",
                        str(REPO.parent / "shared" / "data" / "meld"), "--out-dir", str(data_dir), "--window", "4"],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    single = data_dir / "single_turn"
    single.mkdir(exist_ok=True)
    for split in ("train", "val"):
        table = pq.read_table(data_dir / f"{split}.parquet")
        column = pa.array(["single_turn_agent"] * table.num_rows)
        table = table.set_column(table.schema.get_field_index("agent_name"), "agent_name", column)
        pq.write_table(table, single / f"{split}.parquet")
    return single


def run_arm(name: str, out_dir: Path, data_dir: Path, steps: int, overrides: list[str]) -> dict:
    arm_dir = out_dir / name
    arm_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT_DIR": str(arm_dir), "STEPS": str(steps), "DATA_DIR": str(data_dir)}
    cmd = ["bash", "recipes/run_cpu_smoke.sh", "data.seed=0", *overrides]
    report = run_watched(cmd, env=env, log_path=str(arm_dir / "run.log"))
    if report.returncode != 0:
        raise SystemExit(f"{name} run failed (exit {report.returncode}); see {arm_dir / 'run.log'}")
    lines = (arm_dir / "metrics.jsonl").read_text().splitlines()
    step_s = [json.loads(line)["data"]["timing_s/step"] for line in lines]
    return {"step_wall_s": [round(s, 2) for s in step_s], "median_after_warmup_s": statistics.median(step_s[1:]),
            "total_wall_s": round(report.wall_s, 1), "peak_pss_gib": round(report.peak_pss_gib, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out-dir", default="outputs/bench_selfemo_vs_grpo")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    data_dir = out_dir / "data"
    single = prepare(data_dir)
    selfemo = run_arm("selfemo", out_dir, data_dir, args.steps, [])
    stock = run_arm("stock_grpo", out_dir, single, args.steps,
                    ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.agent.default_agent_loop=single_turn_agent",
                     "data.max_response_length=16"])  # the recognizer's answer budget in the smoke
    ratio = selfemo["median_after_warmup_s"] / stock["median_after_warmup_s"]
    print(json.dumps({"selfemo": selfemo, "stock_grpo": stock, "ratio_selfemo_over_stock": round(ratio, 2)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
