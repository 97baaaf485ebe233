"""selfemo_verl/gpu_check.py and recipes/gpu_check.sh: the first-GPU check. Part 1 (torch only) runs here with the
CPU as the 'device', which exercises every comparison. Part 2 (2 SELF-EMO steps on vLLM + FSDP) needs a GPU node:
here its config goes through the recipes' own dry-run checker, its data through verl's dataset, its pass/fail
rules through worked cases, and its refusals (no CUDA, no vLLM) through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfemo_verl import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_cpu_against_cpu_passes_every_check_with_zero_difference(tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--torch-only", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["passed"] and len(report["checks"]) == 6 and "e2e" not in report
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


def test_full_check_without_vllm_stops_with_one_line_and_exit_2(tmp_path, capsys):
    # reason: this venv has verl but no vllm (the main lane); the full check needs requirements/gpu.txt
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu_check: not installed: vllm (") and "requirements/gpu.txt" in err[0]
    assert not out.exists()


def test_e2e_config_passes_the_recipes_dry_run_checker(tmp_path):
    # reason: the overrides compose with selfemo_trainer.yaml, pass verl's validate_config, our start-up checks and
    # the pre-flight rules (batch arithmetic, one GPU, memory fractions, the tiny model's chat template and the
    # response budget of one episode counted with its tokenizer), as a recipe round would on the cluster
    from selfemo_verl.cpu.assets import primed_tiny_model_dir

    gpu_check.write_data(tmp_path / "data")
    overrides = gpu_check.e2e_overrides(primed_tiny_model_dir(head_dim=32), tmp_path / "data", tmp_path)
    (tmp_path / "overrides.txt").write_text("\n".join(overrides) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"} | {"SKIP_IMPORT_CHECK": "1"}
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "check_config.py"), str(tmp_path / "overrides.txt")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "config.yaml").read_text()
    assert "name: vllm" in config and "adv_estimator: self_grpo" in config


def test_e2e_data_is_read_by_verls_dataset_as_self_play_and_recognize_rows(tmp_path):
    import pyarrow.parquet as pq

    gpu_check.write_data(tmp_path)
    train, val = (pq.read_table(tmp_path / f"{split}.parquet").to_pylist() for split in ("train", "val"))
    assert len(train) == 12 * 4 and len(val) == 4 * 4  # reason: 12 and 4 dialogues of 4 turns, one row per turn
    assert {row["agent_name"] for row in train} == {"selfemo_self_play"}
    assert {row["agent_name"] for row in val} == {"selfemo_recognize"}
    assert sum(bool(row["extra_info"]["next_gold"]) for row in train) == 12 * 3  # reason: the last turn has no next
    assert gpu_check.write_data(tmp_path) is None and pq.read_table(tmp_path / "train.parquet").to_pylist() == train


@pytest.mark.parametrize("rc, steps, failed", [
    (0, [(1, {"actor/grad_norm": 0.3, "training/rollout_probs_diff_max": 0.05}), (2, {"actor/grad_norm": 0.2})], []),
    # reason: a weight sync that left the rollout on other weights shows as a large probability difference
    (0, [(1, {"actor/grad_norm": 0.3, "training/rollout_probs_diff_max": 0.6}), (2, {"actor/grad_norm": 0.2})],
     ["training/rollout_probs_diff_max <= 0.1"]),
    # reason: zero advantages everywhere (no signal) or a NaN loss
    (0, [(1, {"actor/grad_norm": 0.0, "training/rollout_probs_diff_max": 0.01}),
         (2, {"actor/grad_norm": float("nan")})], ["actor/grad_norm finite and non-zero"]),
    # reason: the run died after step 1; the validation line before training is not a step
    (1, [(0, {"val-core/selfemo/weighted_f1/meld": 0.1}), (1, {"actor/grad_norm": 0.3,
                                                               "training/rollout_probs_diff_max": 0.01})],
     ["python -m selfemo_verl.main exit status", "training steps logged"]),
])
def test_e2e_checks_fail_where_the_run_went_wrong(rc, steps, failed):
    checks = gpu_check.e2e_checks(rc, steps)
    assert [check["name"] for check in checks if not check["passed"]] == failed


def test_torch_only_part_imports_nothing_a_bare_gpu_node_lacks(tmp_path):
    # reason: the lent GPU machines have torch and transformers only; part 2's packages must not load for part 1
    blocked = ["verl", "vllm", "ray", "omegaconf", "hydra", "pyarrow", "transformers", "matplotlib", "sklearn"]
    code = ("import sys, runpy\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "sys.argv = ['gpu_check', '--torch-only', '--device', 'cpu', '--out', sys.argv[1]]\n"
            "runpy.run_module('selfemo_verl.gpu_check', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.json")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
