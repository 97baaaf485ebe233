"""Time and measure a CPU end-to-end recipe: per-step wall times, total wall time, peak memory, leftovers.

    python benchmarks/bench_cpu_e2e.py recipes/run_cpu_smoke.sh [--steps 2] [--out-dir outputs/bench_cpu_smoke] [-- overrides]

Environment variables (MODEL_PATH, RAW_DIR, ...) pass through to the recipe. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from selfemo_verl.cpu.watch import run_watched


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir or f"outputs/bench_{Path(args.recipe).stem}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT_DIR": str(out_dir), "STEPS": str(args.steps)}
    cmd = ["bash", args.recipe, *args.overrides]
    report = run_watched(cmd, env=env, log_path=str(out_dir / "run.log"))
    metrics = out_dir / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    result = {
        "command": f"OUT_DIR={out_dir} STEPS={args.steps} " + " ".join(cmd),
        "returncode": report.returncode,
        "total_wall_s": round(report.wall_s, 1),
        "step_wall_s": [round(s["data"]["timing_s/step"], 2) for s in steps],
        "gen_s": [round(s["data"]["timing_s/gen"], 2) for s in steps],
        "update_actor_s": [round(s["data"]["timing_s/update_actor"], 2) for s in steps],
        "peak_pss_gib": round(report.peak_pss_gib, 2),
        "peak_rss_sum_gib": round(report.peak_rss_gib, 2),
        "peak_processes": report.peak_procs,
        "leftover_processes": report.leftovers,
    }
    print(json.dumps(result, indent=1))
    return 0 if report.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
