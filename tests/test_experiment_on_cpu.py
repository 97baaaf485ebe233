"""selfemo_verl.experiment: the CPU experiment's inputs (arm parquet, fixed dev subset) and its table and plot."""

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selfemo_verl import experiment
from selfemo_verl.data.parquet import PARQUET_SCHEMA

REPO = Path(__file__).resolve().parents[1]


def _meld(tmp_path, data_dir):
    spec = importlib.util.spec_from_file_location("prepare_erc", REPO / "data_prep" / "prepare_erc.py")
    prepare_erc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_erc)  # reason: the data prep CLI, run in-process
    out = tmp_path / "meld"
    assert prepare_erc.main(["--dataset", "meld", "--raw-dir", str(data_dir / "meld"), "--out-dir", str(out),
                             "--window", "4"]) == 0
    return out


def test_prepare_writes_one_train_split_per_arm_and_one_fixed_dev_subset(tmp_path, data_dir):
    meld = _meld(tmp_path, data_dir)
    counts = experiment.prepare(meld, tmp_path / "exp", n_dev=50)
    train = pq.read_table(meld / "train.parquet")
    for arm, agent in experiment.AGENTS.items():
        table = pq.read_table(tmp_path / "exp" / arm / "train.parquet")
        assert set(table.column("agent_name").to_pylist()) == {agent}  # reason: only the agent loop differs
        assert table.drop(["agent_name"]).equals(train.drop(["agent_name"])) and table.schema == PARQUET_SCHEMA
    val = pq.read_table(tmp_path / "exp" / "val.parquet")
    indices = [e["index"] for e in val.column("extra_info").to_pylist()]
    assert counts["val"] == val.num_rows == 50 and indices == sorted(indices)  # reason: original order kept
    experiment.prepare(meld, tmp_path / "again", n_dev=50)
    assert pq.read_table(tmp_path / "again" / "val.parquet").equals(val)  # reason: the subset is fixed (seed 0)


def test_prepare_rejects_more_dev_rows_than_the_split_has(tmp_path, data_dir, capsys):
    meld = _meld(tmp_path, data_dir)
    n_val = pq.read_metadata(meld / "val.parquet").num_rows
    assert experiment.main(["prepare", str(meld), str(tmp_path / "exp"), "--n-dev", str(n_val + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "val.parquet" in err and str(n_val + 1) in err
    assert not (tmp_path / "exp").exists()  # reason: nothing half-written


def _run(path, vals, steps_s=10.0):
    """A run's metrics.jsonl: validations {step: (weighted_f1, classes)} plus one training line per step."""
    path.mkdir(parents=True)
    lines = []
    for step in range(max(vals) + 1):
        data = {"timing_s/step": steps_s} if step else {}
        if step in vals:
            f1, classes = vals[step]
            data.update({"val-core/selfemo/weighted_f1/meld": f1, "val-core/selfemo/accuracy/meld": f1 + 0.1,
                         "val-aux/selfemo/macro_f1/meld": f1 / 2, "val-aux/selfemo/parse_failure_rate/meld": 0.0,
                         "val-aux/selfemo/classes_predicted/meld": classes,
                         "val-aux/selfemo/majority_weighted_f1/meld": 0.31,
                         "val-aux/selfemo/majority_accuracy/meld": 0.47})
        lines.append(json.dumps({"step": step, "data": data}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_tables_both_arms_against_the_baselines_of_the_same_rows(tmp_path):
    (tmp_path / "data").mkdir()
    pq.write_table(PARQUET_SCHEMA.empty_table(), tmp_path / "data" / "val.parquet")
    _run(tmp_path / "selfemo_seed0", {0: (0.20, 1), 4: (0.30, 3)})
    _run(tmp_path / "selfemo_seed1", {0: (0.20, 1), 4: (0.34, 4)})
    _run(tmp_path / "recognize_seed0", {0: (0.20, 1), 4: (0.25, 2), 8: (0.28, 2)}, steps_s=5.0)
    markdown = experiment.report(tmp_path)
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines()}
    assert "| 31.0 |" in rows["majority class (same rows)"]  # reason: weighted-F1 of the constant answer, in %
    assert "| 2 | 4 | 40 | 42.0 ± 2.8 | 32.0 ± 2.8 |" in rows[experiment.ARMS["selfemo"]]
    # reason: seeds 0 and 1 end at weighted-F1 30 and 34 (accuracy = F1 + 10): mean 32, sd 2.83
    assert "| 1 | 8 | 40 | 38.0 | 28.0 |" in rows[experiment.ARMS["recognize"]]
    assert "20.0 ± 0.0" in rows["zero-shot (before training)"]
    assert (tmp_path / "results.md").read_text() == markdown
    assert (tmp_path / "val_weighted_f1.png").read_bytes()[:4] == b"\x89PNG"


def test_report_without_a_final_validation_is_a_one_line_error(tmp_path, capsys):
    _run(tmp_path / "selfemo_seed0", {0: (0.2, 1)})
    assert experiment.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and err.count("\n") == 1
