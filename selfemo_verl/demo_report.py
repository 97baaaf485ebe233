"""Before/after table and reward curve of a training run, from verl's "file" logger output (metrics.jsonl).

Core module (no verl): reads one JSON object per line, `{"step": int, "data": {metric: value}}`. The
validation before training is logged at step 0 (`trainer.val_before_train`), the one after training with
the last step (`trainer.test_freq`). Used by `make demo` (recipes/run_cpu_demo.sh):

    python -m selfemo_verl.demo_report RUN_DIR/metrics.jsonl --dataset meld --out RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from selfemo_verl.files import atomic_write
from selfemo_verl.plots import new_axes, png_bytes

# (row label, metric name pattern with {ds} = dataset, scale to percent?)
TABLE_ROWS = (
    ("accuracy (%)", "val-core/selfemo/accuracy/{ds}", 100.0),
    ("weighted-F1 (%)", "val-core/selfemo/weighted_f1/{ds}", 100.0),
    ("macro-F1 (%)", "val-aux/selfemo/macro_f1/{ds}", 100.0),
    ("parse failures (%)", "val-aux/selfemo/parse_failure_rate/{ds}", 100.0),
    ("classes predicted", "val-aux/selfemo/classes_predicted/{ds}", 1.0),
    ("mean reward", "val-core/selfemo/{ds}/reward/mean@1", 1.0),
    ("majority class: accuracy (%)", "val-aux/selfemo/majority_accuracy/{ds}", 100.0),
    ("majority class: weighted-F1 (%)", "val-aux/selfemo/majority_weighted_f1/{ds}", 100.0),
)
CURVES = ("critic/score/mean", "selfemo/r_rec", "selfemo/r_con", "selfemo/consistency_mean")


def read_metrics(path) -> list[tuple[int, dict]]:
    """(step, metrics) per line; a malformed line is a ValueError naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append((int(obj["step"]), dict(obj["data"])))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{lineno}: not a verl file-logger line ({err})") from None
    return rows


def before_after(rows: list[tuple[int, dict]], dataset: str) -> list[tuple[str, float, float]]:
    """(label, before, after) for every TABLE_ROWS metric; nan where a validation did not log it.

    >>> rows = [(0, {"val-core/selfemo/accuracy/meld": 0.25}), (1, {"x": 1}), (2, {"val-core/selfemo/accuracy/meld": 0.5})]
    >>> before_after(rows, "meld")[0]
    ('accuracy (%)', 25.0, 50.0)
    """
    vals = [(step, data) for step, data in rows if any(k.startswith("val-") for k in data)]
    first = vals[0][1] if vals else {}
    last = vals[-1][1] if len(vals) > 1 else {}
    out = []
    for label, pattern, scale in TABLE_ROWS:
        name = pattern.format(ds=dataset)
        out.append((label, scale * float(first.get(name, math.nan)), scale * float(last.get(name, math.nan))))
    return out


def format_table(table: list[tuple[str, float, float]]) -> str:
    """A markdown table: metric | before | after | change."""
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for label, before, after in table:
        lines.append(f"| {label} | {before:.2f} | {after:.2f} | {after - before:+.2f} |")
    return "\n".join(lines)


def verdict(table: list[tuple[str, float, float]]) -> str:
    """One line: the trained model's weighted-F1 and classes predicted beside the majority baseline on the same rows.

    >>> verdict([("weighted-F1 (%)", 20.0, 35.0), ("classes predicted", 1, 3),
    ...          ("majority class: weighted-F1 (%)", 31.0, 31.0)])
    'after training: weighted-F1 35.00 vs 31.00 (majority class, same rows): above; 3 classes predicted'
    """
    cells = {label: after for label, _, after in table}
    ours, majority = cells["weighted-F1 (%)"], cells["majority class: weighted-F1 (%)"]
    side = "above" if ours > majority else "not above"
    return (f"after training: weighted-F1 {ours:.2f} vs {majority:.2f} (majority class, same rows): {side}; "
            f"{cells['classes predicted']:.0f} classes predicted")


def plot_curves(rows: list[tuple[int, dict]], out_png: Path) -> list[str]:
    """Save the training reward curves (those of CURVES that were logged); return the plotted names."""
    fig, ax = new_axes((6, 4))
    plotted = []
    for name in CURVES:
        points = [(step, data[name]) for step, data in rows if name in data and step > 0]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
            plotted.append(name)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean over the step's episodes")
    ax.set_title("SELF-EMO CPU demo: training rewards")
    ax.legend()
    atomic_write(out_png, png_bytes(fig))
    return plotted


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Before/after table and reward curve of a run")
    parser.add_argument("metrics", help="metrics.jsonl written by verl's file logger")
    parser.add_argument("--dataset", default="meld")
    parser.add_argument("--out", required=True, help="folder for report.md and reward_curve.png")
    args = parser.parse_args(argv)
    try:
        rows = read_metrics(args.metrics)
    except (OSError, ValueError) as err:
        print(f"demo_report: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    values = before_after(rows, args.dataset)
    table = format_table(values) + "\n\n" + verdict(values)
    plotted = plot_curves(rows, out / "reward_curve.png")
    atomic_write(out / "report.md", table + "\n")
    print(table)
    print(f"reward curve ({', '.join(plotted) or 'nothing logged'}): {out / 'reward_curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
