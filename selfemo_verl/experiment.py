"""The CPU experiment (recipes/run_cpu_experiment.sh): its inputs, and its table and plot from the runs' logs.

Core module (no verl, no ray). Two arms train SmolLM2 from the same start, with the same seeds and the same
training time (`selfemo.trainer.time_budget_s`), and verl's validation scores one fixed MELD-dev subset before
training, every few steps and after:
- `selfemo`:   the self-play agent loop and SELF-GRPO (recognize + respond + blind judge, group consistency);
- `recognize`: GRPO on recognition only (the `selfemo_recognize` agent loop and verl's `grpo`).

    python -m selfemo_verl.experiment prepare DATA_DIR OUT_DIR --n-dev 200    # the arms' parquet
    python -m selfemo_verl.experiment report EXP_DIR                           # results.md, val_weighted_f1.png

Baselines on the same rows: the majority class (`val-aux/selfemo/majority_*`, logged by every validation) and
zero-shot (the validation before training, i.e. the untrained model). A bad input is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selfemo_verl.data.parquet import write_parquet
from selfemo_verl.demo_report import read_metrics
from selfemo_verl.eval.metrics import mean_sd
from selfemo_verl.files import atomic_write
from selfemo_verl.plots import new_axes, png_bytes

ARMS = {"selfemo": "SELF-EMO (self-play, SELF-GRPO)", "recognize": "GRPO, recognition only"}
AGENTS = {"selfemo": "selfemo_self_play", "recognize": "selfemo_recognize"}
COLUMNS = (  # (header, metric pattern with {ds}, scale)
    ("accuracy", "val-core/selfemo/accuracy/{ds}", 100.0),
    ("weighted-F1", "val-core/selfemo/weighted_f1/{ds}", 100.0),
    ("macro-F1", "val-aux/selfemo/macro_f1/{ds}", 100.0),
    ("parse fail", "val-aux/selfemo/parse_failure_rate/{ds}", 100.0),
    ("classes", "val-aux/selfemo/classes_predicted/{ds}", 1.0),
)
MAJORITY = (("accuracy", "val-aux/selfemo/majority_accuracy/{ds}"),
            ("weighted-F1", "val-aux/selfemo/majority_weighted_f1/{ds}"))


class ExperimentError(ValueError):
    """A bad input file or folder: printed as one line, exit status 2."""


def prepare(data_dir, out_dir, n_dev: int, seed: int = 0) -> dict:
    """OUT/<arm>/train.parquet (the train split with the arm's agent loop) and OUT/val.parquet (n_dev val rows
    drawn once with `seed`, in their original order); returns {name: rows}."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    try:
        train, val = pq.read_table(data_dir / "train.parquet"), pq.read_table(data_dir / "val.parquet")
    except (OSError, pa.ArrowInvalid) as err:
        raise ExperimentError(f"{data_dir}: not a prepared dataset folder ({err})") from None
    if not 0 < n_dev <= val.num_rows:
        raise ExperimentError(f"{data_dir / 'val.parquet'}: --n-dev {n_dev} not in 1..{val.num_rows}")
    rows = np.sort(np.random.default_rng(seed).choice(val.num_rows, size=n_dev, replace=False))
    write_parquet(out_dir / "val.parquet", val.take(pa.array(rows)))
    column = train.schema.get_field_index("agent_name")
    for arm, agent in AGENTS.items():
        write_parquet(out_dir / arm / "train.parquet",
                      train.set_column(column, "agent_name", pa.array([agent] * train.num_rows)))
    return {"val": n_dev, **{arm: train.num_rows for arm in AGENTS}}


def validations(rows: list[tuple[int, dict]], dataset: str) -> list[tuple[int, dict]]:
    """(step, {column: value}) of every validation in a run's metrics, in step order.

    >>> validations([(0, {"val-core/selfemo/weighted_f1/meld": 0.3}), (1, {"critic/score/mean": 1.0})], "meld")
    [(0, {'weighted-F1': 30.0})]
    """
    out = []
    for step, data in rows:
        values = {name: scale * float(data[p.format(ds=dataset)])
                  for name, p, scale in COLUMNS if p.format(ds=dataset) in data}
        if values:
            out.append((step, values))
    return out


def _run(run_dir: Path, dataset: str) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    vals = validations(rows, dataset)
    if len(vals) < 2 or vals[0][0] != 0:
        raise ExperimentError(f"{run_dir / 'metrics.jsonl'}: needs a validation at step 0 and one after training")
    data = dict(rows)
    last = vals[-1][0]
    return {"vals": vals, "steps": last, "train_s": sum(d.get("timing_s/step", 0.0) for s, d in rows if s > 0),
            "majority": {name: 100.0 * float(data[last].get(p.format(ds=dataset), math.nan)) for name, p in MAJORITY}}


def _span(values: list[float]) -> str:
    """'8' when every run has the same value, else 'min–max' (whole numbers)."""
    low, high = round(min(values)), round(max(values))
    return f"{low}" if low == high else f"{low}–{high}"


def _cell(values: list[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def table(runs: dict[str, list[dict]], n_dev: int) -> str:
    """Markdown: majority and zero-shot baselines, then each arm after training (mean ± sd over seeds).

    "step s" sums the runs' `timing_s/step` (validations excluded; the time budget counts them too).
    """
    names = [name for name, _, _ in COLUMNS]
    lines = [f"| MELD dev, {n_dev} fixed rows | seeds | steps | step s | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    first = next(iter(runs.values()))
    majority = {name: first[0]["majority"][name] for name, _ in MAJORITY}
    lines.append("| majority class (same rows) | – | – | – | " +
                 " | ".join(f"{majority[n]:.1f}" if n in majority else "–" for n in names) + " |")
    zero = [r["vals"][0][1] for arm in runs.values() for r in arm]
    cells = " | ".join(_cell([z[n] for z in zero]) for n in names)
    lines.append(f"| zero-shot (before training) | – | 0 | – | {cells} |")
    for arm, arm_runs in runs.items():
        after = [r["vals"][-1][1] for r in arm_runs]
        cells = " | ".join(_cell([a[n] for a in after]) for n in names)
        lines.append(f"| {ARMS[arm]} | {len(arm_runs)} | {_span([r['steps'] for r in arm_runs])} | "
                     f"{_span([r['train_s'] for r in arm_runs])} | {cells} |")
    return "\n".join(lines) + "\n"


def _eval_lines(exp_dir: Path) -> str:
    """The `eval generate` scores of the same rows (zero-shot and each trained model), with their confusion PNG."""
    found = sorted(exp_dir.glob("zero_shot/metrics.json")) + sorted(exp_dir.glob("*_seed*/dev_eval/metrics.json"))
    lines = []
    for path in found:
        m = json.loads(path.read_text(encoding="utf-8"))
        lines.append(f"- {path.parent.relative_to(exp_dir)}: accuracy {100 * m['accuracy']:.1f}, weighted-F1 "
                     f"{100 * m['weighted_f1']:.1f}, parse failures {100 * m['parse_failure_rate']:.1f} % "
                     f"({path.parent.relative_to(exp_dir)}/confusion_matrix.png)")
    return "\nScored again by `eval generate` (greedy, same rows):\n" + "\n".join(lines) + "\n" if lines else ""


def plot(runs: dict[str, list[dict]], out_png: Path) -> None:
    """Validation weighted-F1 over training steps, one line per run, the majority baseline dashed."""
    fig, ax = new_axes((6.4, 4.0))
    for arm, arm_runs in runs.items():
        for run in arm_runs:
            steps, f1 = zip(*[(step, v["weighted-F1"]) for step, v in run["vals"]])
            ax.plot(steps, f1, marker="o", label=f"{ARMS[arm]}, seed {run['seed']}")
    ax.axhline(next(iter(runs.values()))[0]["majority"]["weighted-F1"], linestyle="--", color="gray",
               label="majority class")
    ax.set(xlabel="training step", ylabel="validation weighted-F1 (%)", title="SmolLM2-135M on MELD dev, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out_png, png_bytes(fig))


def report(exp_dir, dataset: str = "meld") -> str:
    """Read EXP/<arm>_seed<S>/metrics.jsonl, write EXP/results.md and EXP/val_weighted_f1.png; return the table."""
    exp_dir = Path(exp_dir)
    runs: dict[str, list[dict]] = {}
    for arm in ARMS:
        for run_dir in sorted(exp_dir.glob(f"{arm}_seed*")):
            runs.setdefault(arm, []).append({**_run(run_dir, dataset), "seed": run_dir.name.split("_seed")[-1]})
    if not runs:
        raise ExperimentError(f"{exp_dir}: no <arm>_seed<S> run folders ({', '.join(ARMS)})")
    n_dev = pq.read_metadata(exp_dir / "data" / "val.parquet").num_rows
    markdown = table(runs, n_dev) + _eval_lines(exp_dir)
    atomic_write(exp_dir / "results.md", markdown)
    plot(runs, exp_dir / "val_weighted_f1.png")
    return markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.experiment", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="the arms' train parquet and the fixed dev subset")
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    p.add_argument("--n-dev", type=int, default=200)
    r = sub.add_parser("report", help="results.md and val_weighted_f1.png of an experiment folder")
    r.add_argument("exp_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print(json.dumps(prepare(args.data_dir, args.out_dir, args.n_dev)))
        else:
            print(report(args.exp_dir), end="")
    except (ExperimentError, ValueError, OSError) as err:
        print(f"experiment: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
