"""Wall time and peak memory of data_prep/prepare_erc.py on the three datasets (target: < 10 s, < 1 GiB).

    python benchmarks/bench_prepare.py [--data-dir ../shared/data] [--window 12]

Each dataset runs in its own child process (the real CLI, imports included); peak memory is that child's
maximum resident set size from os.wait4. Output goes to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("meld", "emorynlp", "iemocap")


def run_one(dataset: str, data_dir: Path, out: Path, window: int) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one CLI run; raises if it fails."""
    cmd = [sys.executable, str(REPO / "data_prep" / "prepare_erc.py"), "--dataset", dataset,
           "--raw-dir", str(data_dir / dataset), "--out-dir", str(out / dataset), "--window", str(window)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{dataset}: prepare_erc.py exited {code}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("SELFEMO_DATA_DIR", str(REPO.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=Path(default_data))
    parser.add_argument("--window", type=int, default=12)
    args = parser.parse_args()
    total_wall, peak = 0.0, 0.0
    print(f"{'dataset':<10}{'wall_s':>8}{'peak_MiB':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in DATASETS:
            wall, rss = run_one(dataset, args.data_dir, Path(tmp), args.window)
            total_wall, peak = total_wall + wall, max(peak, rss)
            print(f"{dataset:<10}{wall:>8.2f}{rss:>10.0f}")
    verdict = "OK" if total_wall < 10 and peak < 1024 else "OVER TARGET"
    print(f"{'all three':<10}{total_wall:>8.2f}{peak:>10.0f}   target < 10 s and < 1024 MiB: {verdict}")


if __name__ == "__main__":
    main()
