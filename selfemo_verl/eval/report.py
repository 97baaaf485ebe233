"""Evaluation results (docs/method.md §9): score a predictions file into metrics.json, and report over runs.

Core module: no verl, no ray. `score` writes metrics.json, confusion_matrix.png and results_row.md of one run;
`report` gives each run's row and the mean ± sample sd per dataset and test size (never pooling different test
sets). The metrics themselves are `selfemo_verl.eval.metrics`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from selfemo_verl.eval.inputs import Gold, InputError, read_gold, read_predictions
from selfemo_verl.eval.metrics import corpus_metrics, mean_sd
from selfemo_verl.files import atomic_write
from selfemo_verl.plots import confusion_png

_PCT_KEYS = ("accuracy", "weighted_f1", "macro_f1", "parse_failure_rate")


def results_row(metrics: dict) -> str:
    """A row for a table of published LLM-ERC results (wF1 in the dataset's column, %, 2 decimals)."""
    cells = {space: "–" for space in ("iemocap", "meld", "emorynlp")}
    cells[metrics["label_space"]] = f"{100 * metrics['weighted_f1']:.2f}"
    notes = (f"ours; n={metrics['n']}, macro-F1 {100 * metrics['macro_f1']:.2f}, parse failures "
             f"{100 * metrics['parse_failure_rate']:.1f} % (counted wrong); text-only, past-only context")
    return (f"| {metrics['name']} | {metrics['backbone']} | {cells['iemocap']} | {cells['meld']} | "
            f"{cells['emorynlp']} | {100 * metrics['accuracy']:.2f} | {metrics['predictions']} | {notes} |\n")


def score(predictions_path, data_path, out_dir, name=None, backbone="–", limit=None, extra=None) -> dict:
    """Score a predictions JSONL against a test parquet (its first `limit` rows if given); write
    metrics.json (with the `extra` keys, e.g. the chosen checkpoint), confusion_matrix.png and results_row.md
    into `out_dir`."""
    gold = read_gold(data_path)
    if limit is not None:
        gold = Gold(gold.path, gold.data_source, gold.label_space, gold.indices[:limit], gold.labels[:limit])
    outputs = read_predictions(predictions_path, gold.indices)
    metrics = corpus_metrics([outputs.get(i) for i in gold.indices], gold.labels, gold.label_space)
    out_dir = Path(out_dir)
    head = {"name": name or out_dir.resolve().name, "backbone": backbone, "data_source": gold.data_source,
            "label_space": gold.label_space, "predictions": str(predictions_path), "data": gold.path, "limit": limit,
            **(extra or {})}
    metrics = {**head, **metrics}
    title = f"{head['name']} on {gold.data_source} (n={metrics['n']})"
    png, row = confusion_png(metrics["confusion"], title), results_row(metrics)
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write(out_dir / "confusion_matrix.png", png)
    atomic_write(out_dir / "results_row.md", row)
    return metrics


def _pct(value: float) -> str:
    """A rate as a percentage with 2 decimals; NaN (no spread over one run) as a dash.

    >>> _pct(0.1234), _pct(float("nan"))
    ('12.34', '–')
    """
    return "–" if math.isnan(value) else f"{100 * value:.2f}"


def _load_run(run_dir) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: malformed JSON ({err.msg})") from None
    missing = [k for k in ("label_space", "n", *_PCT_KEYS) if k not in metrics]
    if missing:
        raise InputError(f"{path}: missing keys {missing}")
    return {**metrics, "run": str(run_dir)}


def report(run_dirs) -> tuple[str, dict]:
    """Markdown (a row per run, then mean ± sd per dataset and test size n, %) and the summary dict."""
    runs = [_load_run(d) for d in run_dirs]
    lines = ["| run | dataset | n | acc | weighted-F1 | macro-F1 | parse fail |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['label_space']} | {r['n']} | " + " | ".join(_pct(r[k]) for k in _PCT_KEYS) + " |"
              for r in runs]
    summary: dict = {}
    lines += ["", "| dataset, n | runs | acc | weighted-F1 | macro-F1 | parse fail |", "|---|---|---|---|---|---|"]
    for key in sorted({f"{r['label_space']} n={r['n']}" for r in runs}):  # never pool different test sets
        group = [r for r in runs if f"{r['label_space']} n={r['n']}" == key]
        stats = {k: mean_sd(r[k] for r in group) for k in _PCT_KEYS}
        summary[key] = {"runs": [r["run"] for r in group],
                        **{k: {"mean": m, "sd": None if math.isnan(s) else s} for k, (m, s) in stats.items()}}
        cells = " | ".join(f"{_pct(m)} ± {_pct(s)}" for m, s in stats.values())
        lines.append(f"| {key} | {len(group)} | {cells} |")
    return "\n".join(lines + _checkpoint_lines(runs)) + "\n", summary


def _checkpoint_lines(runs) -> list[str]:
    """Name the checkpoint each run evaluated when it was chosen on val (`eval generate --selection`)."""
    chosen = [f"- {r['run']}: round {c['round']}, global step {c['step']}, val weighted-F1 "
              f"{_pct(c['val_weighted_f1'])} %, {c['path']}" for r in runs if (c := r.get("checkpoint"))]
    return ["", "Model selection on val (best val weighted-F1 over all rounds):", *chosen] if chosen else []
