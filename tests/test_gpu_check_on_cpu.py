"""selfemo_verl/gpu_check.py and recipes/gpu_check.sh: the torch-only first-GPU check (run here with the CPU as
the 'device', which exercises every comparison; the CUDA run itself needs a GPU node)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from selfemo_verl import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_cpu_against_cpu_passes_every_check_with_zero_difference(tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--torch-only", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and len(report["checks"]) == 5
    assert all(check["max_abs_diff"] == 0.0 for check in report["checks"])  # reason: same device, same math


def test_a_device_that_computes_differently_fails_the_check(tmp_path, monkeypatch):
    real = gpu_check.self_grpo_advantage

    def off_by_a_little(rewards, *args, **kwargs):  # reason: stands in for a device whose arithmetic drifts
        advantages, returns = real(rewards, *args, **kwargs)
        if isinstance(args[2], torch.Tensor) and advantages.dtype == torch.float32:  # one path only
            advantages = advantages + 1e-4 * (advantages != 0).float()
        return advantages, returns

    monkeypatch.setattr(gpu_check, "self_grpo_advantage", off_by_a_little)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--torch-only", "--device", "cpu", "--out", str(out)]) == 1
    failed = [check["name"] for check in json.loads(out.read_text())["checks"] if not check["passed"]]
    assert failed == ["self_grpo_advantage float32, consistency as device tensor"]


def test_the_batch_has_singletons_parse_failures_and_infra_failures():
    batch = gpu_check.step_batch(0)
    _, counts = __import__("numpy").unique(batch["uids"], return_counts=True)
    assert counts.min() == 1 and counts.max() > 2
    assert (~batch["member"]).any() and (batch["member"] & ~batch["voters"]).any()


def test_recipe_without_cuda_stops_with_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(REPO / "recipes" / "gpu_check.sh")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA device")
    assert not (tmp_path / "gpu_check.json").exists()
