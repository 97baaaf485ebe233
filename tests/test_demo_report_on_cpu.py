"""The demo's before/after table and reward curve, from verl file-logger lines."""

import json
import math

import pytest

from selfemo_verl.demo_report import before_after, format_table, main, read_metrics, verdict


def _write(path, rows):
    path.write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in rows), encoding="utf-8")


def test_before_is_the_first_validation_and_after_the_last(tmp_path):
    rows = [
        (0, {"val-core/selfemo/weighted_f1/meld": 0.10, "val-core/selfemo/meld/reward/mean@1": 0.2}),
        (1, {"critic/score/mean": 0.3}),
        (2, {"critic/score/mean": 0.4, "val-core/selfemo/weighted_f1/meld": 0.25}),
    ]
    table = dict((label, (b, a)) for label, b, a in before_after(rows, "meld"))
    assert table["weighted-F1 (%)"] == pytest.approx((10.0, 25.0))  # reason: fractions shown as percent
    before, after = table["mean reward"]
    assert before == pytest.approx(0.2) and math.isnan(after)  # reason: not logged after -> nan, not 0
    assert "| weighted-F1 (%) | 10.00 | 25.00 | +15.00 |" in format_table(before_after(rows, "meld"))


def test_cli_writes_report_and_png(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    _write(metrics, [(0, {"val-core/selfemo/accuracy/meld": 0.5}), (1, {"critic/score/mean": 0.1}),
                     (2, {"critic/score/mean": 0.2, "val-core/selfemo/accuracy/meld": 0.6})])
    assert main([str(metrics), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "reward_curve.png").stat().st_size > 1000
    assert "| accuracy (%) | 50.00 | 60.00 | +10.00 |" in (tmp_path / "out" / "report.md").read_text()
    assert "critic/score/mean" in capsys.readouterr().out


def test_malformed_metrics_line_is_a_one_line_error_with_exit_2(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "data": {}}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2:"):
        read_metrics(metrics)
    assert main([str(metrics), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_verdict_compares_with_the_majority_baseline_of_the_same_validation():
    rows = [(0, {"val-core/selfemo/weighted_f1/meld": 0.10, "val-aux/selfemo/majority_weighted_f1/meld": 0.31}),
            (4, {"val-core/selfemo/weighted_f1/meld": 0.30, "val-aux/selfemo/majority_weighted_f1/meld": 0.31,
                 "val-aux/selfemo/classes_predicted/meld": 2})]
    line = verdict(before_after(rows, "meld"))
    assert "30.00 vs 31.00" in line and ": not above;" in line  # reason: 30 < 31 on the same rows
    assert line.endswith("2 classes predicted")
