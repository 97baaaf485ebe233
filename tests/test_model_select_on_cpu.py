"""selfemo_verl.model_select: model selection on val over all rounds (docs/method.md §8.2) and the recipes'
start-up check.

Round directories are built by hand the way verl 0.9.1 leaves them: `metrics.jsonl` from its file logger (one
`{"step", "data"}` line per step; the step-0 line is `trainer.val_before_train`) and `ckpt/global_step_<n>/<HF>`.
"""

from __future__ import annotations

import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfemo_verl import model_select
from selfemo_verl.model_select import SelectionError, check_overrides, main, select

HF = "actor/huggingface"
KEY = "val-core/selfemo/weighted_f1/meld"


def make_round(root: Path, r: int, val: dict, saved=(), lines_file="metrics.jsonl") -> Path:
    """round_r with a file-logger line per step of `val` ({step: weighted-F1, or None = no validation that step})
    and an HF checkpoint at each step of `saved`."""
    rdir = root / f"round_{r}"
    for step in saved:
        save_export(rdir / "ckpt" / f"global_step_{step}" / HF)
    rdir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "data": {"critic/score/mean": 0.1, **({KEY: v} if v is not None else {})}}
             for s, v in val.items()]
    (rdir / lines_file).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return rdir


TINY = {"vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 16,
        "num_attention_heads": 2}  # about 1.1k parameters


def save_export(hf_dir: Path, weights: bool = True) -> None:
    """An HF export as FSDP writes it: config.json, and (unless `weights` is False) a weight file of 2 bytes/param."""
    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(TINY))
    if weights:
        (hf_dir / "model.safetensors").write_bytes(b"\0" * 4096)


def chosen(choice: dict) -> tuple:
    c = choice["chosen"]
    return c["round"], c["step"], c["val_weighted_f1"]


def test_the_best_val_weighted_f1_over_all_rounds_wins_not_the_last_checkpoint(tmp_path):
    rounds = [make_round(tmp_path, 0, {0: 0.20, 10: 0.31, 20: 0.35}, saved=(10, 20)),
              make_round(tmp_path, 1, {0: 0.35, 10: 0.52, 20: 0.47}, saved=(10, 20)),  # reason: best mid-round
              make_round(tmp_path, 2, {0: 0.47, 10: 0.44, 20: 0.41}, saved=(10, 20))]  # reason: later rounds worse
    choice = select(rounds, "meld", HF)
    assert chosen(choice) == (1, 10, 0.52)
    assert choice["chosen"]["path"] == str(rounds[1] / "ckpt" / "global_step_10" / HF)
    assert choice["chosen"]["round_dir"] == str(rounds[1]) and choice["metric"] == KEY


def test_ties_go_to_the_earlier_round_then_the_earlier_step(tmp_path):
    rounds = [make_round(tmp_path, 0, {10: 0.4, 20: 0.5}, saved=(10, 20)),
              make_round(tmp_path, 1, {10: 0.5, 20: 0.5}, saved=(10, 20))]
    assert chosen(select(rounds, "meld", HF)) == (0, 20, 0.5)  # reason: three-way tie, round 0 step 20 is first
    assert chosen(select(rounds[1:], "meld", HF)) == (0, 10, 0.5)  # reason: same round: step 10 before step 20


def test_an_export_without_weight_files_cannot_be_chosen(tmp_path):
    rounds = [make_round(tmp_path, 0, {10: 0.4, 20: 0.9}, saved=(10,))]
    save_export(rounds[0] / "ckpt" / "global_step_20" / HF, weights=False)  # reason: config.json alone, no weights
    choice = select(rounds, "meld", HF)
    assert chosen(choice) == (0, 10, 0.4)  # reason: the better step 20 has nothing to evaluate
    assert [(b["step"], "no weight files" in b["reason"]) for b in choice["incomplete_exports"]] == [(20, True)]


def test_steps_without_a_validation_or_without_a_checkpoint_cannot_be_chosen(tmp_path):
    rdir = make_round(tmp_path, 0, {0: 0.99,  # reason: val_before_train, the starting model: nothing saved
                                    10: None,  # reason: saved but not validated
                                    15: float("nan"),  # reason: validated to nan: not comparable
                                    20: 0.30, 25: 0.90},  # reason: 25 validated but its checkpoint is gone
                      saved=(10, 15, 20))
    choice = select([rdir], "meld", HF)
    assert chosen(choice) == (0, 20, 0.30)
    assert [(c["step"], c["path"] is None) for c in choice["validated"]] == [(0, True), (20, False), (25, True)]
    assert [u["step"] for u in choice["not_validated"]] == [10, 15]


def test_another_datasets_metric_does_not_count(tmp_path):
    rdir = make_round(tmp_path, 0, {10: 0.4}, saved=(10,))
    with pytest.raises(SelectionError, match="no checkpoint to choose"):
        select([rdir], "emorynlp", HF)  # reason: only val-core/selfemo/weighted_f1/meld was logged


def test_an_interrupted_attempts_lines_count_and_a_later_line_for_a_step_wins(tmp_path):
    # reason: verl's file logger truncates metrics.jsonl on resume; the recipe keeps the old file as an attempt
    rdir = make_round(tmp_path, 0, {10: 0.70, 20: 0.10}, saved=(10, 20, 30), lines_file="metrics_attempt_1.jsonl")
    make_round(tmp_path, 0, {20: 0.50, 30: 0.60}, lines_file="metrics.jsonl")  # resumed from 10: 20 re-run
    choice = select([rdir], "meld", HF)
    assert chosen(choice) == (0, 10, 0.70)
    assert {c["step"]: c["val_weighted_f1"] for c in choice["validated"]} == {10: 0.70, 20: 0.50, 30: 0.60}


def test_cli_writes_and_prints_the_choice_as_json(tmp_path):
    rounds = [make_round(tmp_path, 0, {5: 0.3}, saved=(5,)), make_round(tmp_path, 1, {5: 0.6}, saved=(5,))]
    out = tmp_path / "sel" / "selection.json"
    result = subprocess.run([sys.executable, "-m", "selfemo_verl.model_select", "select", *map(str, rounds),
                             "--dataset", "meld", "--hf-subdir", HF, "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(out.read_text())
    assert chosen(json.loads(out.read_text())) == (1, 5, 0.6)
    assert "round 1 step 5" in result.stderr


@pytest.mark.parametrize("case", ["no_checkpoint", "no_metrics_file", "malformed_line"])
def test_nothing_to_choose_or_a_bad_metrics_file_exits_2_with_one_line(case, tmp_path):
    rdir = make_round(tmp_path, 0, {0: 0.5, 10: 0.6}, saved=() if case == "no_checkpoint" else (10,))
    if case == "no_metrics_file":
        (rdir / "metrics.jsonl").unlink()
    if case == "malformed_line":
        (rdir / "metrics.jsonl").write_text('{"step": 1, "data": {}}\n{"step": 2, "da\n')
    out = tmp_path / "selection.json"
    result = subprocess.run([sys.executable, "-m", "selfemo_verl.model_select", "select", str(rdir), "--dataset",
                             "meld", "--hf-subdir", HF, "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and not out.exists()
    assert result.stderr.startswith("model_select: error: ")
    expected = {"no_checkpoint": "(0, 10)", "no_metrics_file": f"{rdir / 'metrics.jsonl'}: no such file",
                "malformed_line": f"{rdir / 'metrics.jsonl'}:2"}[case]
    assert expected in result.stderr  # reason: names the steps, or the file (and line)


RECIPE = ["trainer.save_freq=20", "trainer.test_freq=20", 'trainer.logger=["console","file"]',
          "trainer.max_actor_ckpt_to_keep=null"]


def test_check_accepts_the_recipe_overrides_and_takes_the_last_value_of_a_key():
    check_overrides(RECIPE)
    check_overrides([*RECIPE, "trainer.test_freq=5", "++trainer.test_freq=20"])  # reason: Hydra: the last one wins
    check_overrides(RECIPE[:3])  # reason: max_actor_ckpt_to_keep unset = verl's null


@pytest.mark.parametrize("extra, message", [
    (["trainer.test_freq=10"], "trainer.save_freq=20 and trainer.test_freq=10 must be equal"),
    (["trainer.save_freq=-1", "trainer.test_freq=-1"], "must be equal and > 0"),
    (['trainer.logger=["console","wandb"]'], 'lacks "file"'),
    (["trainer.max_actor_ckpt_to_keep=1"], "trainer.max_actor_ckpt_to_keep=1 must be null"),
])
def test_check_refuses_overrides_under_which_a_validated_step_could_lack_a_checkpoint(extra, message):
    with pytest.raises(SelectionError, match=message.replace("(", r"\(")):
        check_overrides([*RECIPE, *extra])
    assert main(["check", *RECIPE, *extra]) == 2


def test_check_needs_the_frequencies_and_the_logger_set():
    with pytest.raises(SelectionError, match=r"do not set \['trainer.test_freq', 'trainer.logger'\]"):
        check_overrides(["trainer.save_freq=20"])


def test_module_imports_without_verl_or_ray():
    code = ("import sys; sys.modules['verl'] = None; sys.modules['ray'] = None\n"
            "import selfemo_verl.model_select\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('verl', 'ray') and sys.modules[m] is not None]\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_docstring_examples_hold():
    failures, tried = doctest.testmod(model_select, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
