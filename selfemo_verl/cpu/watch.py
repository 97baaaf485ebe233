"""Run a command and watch its whole process tree: peak memory, leftovers, wall time (CPU e2e tests, benchmarks).

Ray's local cluster (gcs_server, raylet, workers) descends from the driver, so sampling the driver's
descendants sees every process of a CPU run. Memory is the sum over the tree of PSS (proportional set size:
shared pages split between the processes sharing them), which does not count torch's libraries once per
process as RSS does; the RSS sum is reported too, as an upper bound.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field

import psutil

GIB = 1024**3


@dataclass
class WatchReport:
    returncode: int
    wall_s: float
    peak_pss_gib: float
    peak_rss_gib: float
    peak_procs: int
    leftovers: list[str] = field(default_factory=list)  # "pid name" of tree processes still alive after the wait


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _memory(procs: list[psutil.Process]) -> tuple[int, int]:
    pss = rss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss, rss = pss + info.pss, rss + info.rss
    return pss, rss


def alive(procs: dict[int, psutil.Process]) -> list[str]:
    """"pid name" of each process in `procs` still running (zombies count as gone)."""
    out = []
    for pid, proc in procs.items():
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {proc.name()}")
        except psutil.NoSuchProcess:
            continue
    return out


def run_watched(cmd: list[str], env: dict | None = None, log_path: str | None = None, timeout_s: float = 600,
                interval_s: float = 1.0, settle_s: float = 30.0) -> WatchReport:
    """Run `cmd`, sampling its tree every `interval_s`; after it exits, wait up to `settle_s` for the tree to go."""
    seen: dict[int, psutil.Process] = {}
    peak_pss = peak_rss = peak_procs = 0
    start = time.monotonic()
    with open(log_path or os.devnull, "w") as log:
        child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(child.pid)
        while child.poll() is None:
            if time.monotonic() - start > timeout_s:
                child.kill()  # only the command we started; the leftover check below reports the rest
                break
            procs = _tree(root)
            seen.update({p.pid: p for p in procs})
            pss, rss = _memory(procs)
            peak_pss, peak_rss, peak_procs = max(peak_pss, pss), max(peak_rss, rss), max(peak_procs, len(procs))
            time.sleep(interval_s)
        returncode = child.wait()
    wall = time.monotonic() - start
    deadline = time.monotonic() + settle_s
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(1.0)
    return WatchReport(returncode, wall, peak_pss / GIB, peak_rss / GIB, peak_procs, alive(seen))
