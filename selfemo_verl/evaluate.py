"""Evaluation metrics and CLI (docs/method.md §9): accuracy, weighted-F1, parse failures, consistency, reports.

Core module: no verl, no ray (torch/transformers/vLLM only load in `selfemo_verl.eval_generate`).

    python -m selfemo_verl.evaluate score --predictions P.jsonl --data test.parquet --out DIR
    python -m selfemo_verl.evaluate generate --model PATH --data test.parquet --out DIR [--limit N]
    python -m selfemo_verl.evaluate consistency --model PATH --data test.parquet --out DIR [--tau 1.0]
        (--selection FILE for --model: the checkpoint chosen on val by selfemo_verl.model_select; each role's
        token budget: selfemo.agent.max_tokens of the training config, see selfemo_verl.eval_generate)
    python -m selfemo_verl.evaluate report RUN_DIR... [--out report.md]

Scoring rules (Assumption: the paper does not say how a set answer is scored against a single gold label):
1. The gold is the single label in `reward_model.ground_truth` (a test row with another count is an error).
2. A parsed answer with one label predicts that label. A multi-label answer predicts the member of its set
   that comes first in the dataset's label order (LABEL_SPACES, the COSMIC id order): deterministic, never
   looks at the gold, and computable from a label set or bitmask alone, so the trainer's validation hook
   and the CLI agree. `strict_accuracy` (set == {gold}) and `lenient_accuracy` (gold in set) bracket it.
3. A parse failure (any status but "ok") or a row missing from the predictions predicts the sentinel
   FAILURE: wrong for every gold. Accuracy counts it as wrong; F1 is averaged over the dataset's classes
   only (`labels=` the label space), so a failure is a false negative of its gold class and a false
   positive of no class. Weighted-F1 then equals sklearn's plain `f1_score(average="weighted")`, as the
   sentinel has support 0. Weighted-F1 is a corpus statistic: never average it over samples.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from selfemo_verl.files import atomic_write  # noqa: F401  (re-exported for the CLIs)
from selfemo_verl.plots import confusion_png
from selfemo_verl.labels import LABEL_SPACES, check_label_space, parse_emotions
from selfemo_verl.rewards import mask_to_labels

FAILURE = "<parse_failure>"  # sentinel prediction: wrong for every gold, excluded from the F1 label list
MISSING = "missing"  # status of a test row with no prediction
_PCT_KEYS = ("accuracy", "weighted_f1", "macro_f1", "parse_failure_rate")


class InputError(ValueError):
    """A bad user file: the CLI prints this one line and exits with status 2."""


@dataclass(frozen=True)
class Gold:
    """The gold side of one test parquet (one dataset)."""

    path: str
    data_source: str
    label_space: str
    indices: tuple
    labels: tuple


def single_label(labels, label_space: str) -> str:
    """The single-label prediction of a parsed label set (rule 2; empty set -> FAILURE).

    >>> single_label({"joy", "neutral"}, "meld"), single_label({"joy"}, "meld"), single_label(set(), "meld")
    ('neutral', 'joy', '<parse_failure>')
    """
    order = check_label_space(label_space)
    unknown = set(labels) - set(order)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not in label space {label_space!r}")
    return next((label for label in order if label in labels), FAILURE)


def parse_prediction(prediction, label_space: str) -> tuple[frozenset, str]:
    """Raw model text (parsed), a label collection, a bitmask (rewards.labels_to_mask; 0 = nothing parsed)
    or None (missing row) -> (label set, status)."""
    if prediction is None:
        return frozenset(), MISSING
    if isinstance(prediction, str):
        return parse_emotions(prediction, label_space)
    if isinstance(prediction, numbers.Integral):
        prediction = mask_to_labels(int(prediction), label_space)
    labels = frozenset(prediction)
    return labels, ("ok" if labels else "empty")


def _gold_label(gold, label_space: str) -> str:
    if isinstance(gold, numbers.Integral):
        gold = mask_to_labels(int(gold), label_space)
    gold = [gold] if isinstance(gold, str) else list(gold)
    if len(gold) != 1:
        raise ValueError(f"expected exactly one gold label, got {gold!r}")
    return gold[0]


def corpus_metrics(predictions, golds, label_space: str) -> dict:
    """Corpus-level accuracy, weighted/macro-F1 and failure rates of one dataset (rules 1-3).

    `predictions`: as in `parse_prediction`; `golds`: labels, one-label lists or one-bit masks.
    weighted_f1 = sum_k (n_k / n) * F1_k over the label space, n_k the gold support of class k.

    >>> m = corpus_metrics(["<emotion>joy</emotion>", "sure", ["anger"], None], ["joy", "joy", "anger", "fear"], "meld")
    >>> m["accuracy"], m["parse_failure_rate"], round(m["weighted_f1"], 4)
    (0.5, 0.5, 0.5833)
    """
    from sklearn.metrics import accuracy_score, f1_score

    classes = list(check_label_space(label_space))
    parsed = [parse_prediction(p, label_space) for p in predictions]
    y_true = [_gold_label(g, label_space) for g in golds]
    if len(y_true) != len(parsed) or not y_true:
        raise ValueError(f"need as many predictions as golds (and at least one): {len(parsed)} vs {len(y_true)}")
    if not set(y_true) <= set(classes):
        raise ValueError(f"gold labels {sorted(set(y_true) - set(classes))} are not in {label_space!r}")
    y_pred = [single_label(labels, label_space) for labels, _ in parsed]
    statuses = Counter(status for _, status in parsed)
    n = len(y_true)
    return {
        "n": n,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=classes, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
        "parse_failure_rate": 1.0 - statuses["ok"] / n,
        "classes_predicted": len(set(y_pred) - {FAILURE}),
        **majority_baseline(y_true, classes),
        "missing_rate": statuses[MISSING] / n,
        "multi_label_rate": sum(len(s) > 1 for s, _ in parsed) / n,
        "strict_accuracy": sum(s == {g} for (s, _), g in zip(parsed, y_true)) / n,
        "lenient_accuracy": sum(g in s for (s, _), g in zip(parsed, y_true)) / n,
        "status_counts": dict(sorted(statuses.items())),
        "per_class": _per_class(y_true, y_pred, classes),
        "confusion": _confusion(y_true, y_pred, classes),
    }


def majority_baseline(y_true, classes) -> dict:
    """Scores of the constant answer "the most frequent gold label of these rows" (ties: label-space order).

    The strongest constant predictor on the rows scored, so "above the majority baseline" is a fair bar.

    >>> majority_baseline(["joy", "anger", "joy", "fear"], ["anger", "joy", "fear"])["majority_accuracy"]
    0.5
    """
    from sklearn.metrics import f1_score

    counts = Counter(y_true)
    label = max(classes, key=lambda c: (counts[c], -classes.index(c)))
    y_pred = [label] * len(y_true)
    return {"majority_class": label, "majority_accuracy": counts[label] / len(y_true),
            "majority_weighted_f1": float(f1_score(y_true, y_pred, labels=classes, average="weighted",
                                                   zero_division=0))}


def _per_class(y_true, y_pred, classes) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)}


def _confusion(y_true, y_pred, classes) -> dict:
    """Rows = gold classes, columns = classes + FAILURE (counts)."""
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(y_true, y_pred, labels=[*classes, FAILURE])[: len(classes)]
    return {"rows": classes, "columns": [*classes, FAILURE], "counts": matrix.tolist()}


def metrics_by_source(predictions, golds, data_sources, label_spaces) -> dict:
    """`corpus_metrics` per data source, for the trainer's validation step (log e.g. `<source>/weighted_f1`).

    >>> out = metrics_by_source(["joy", "anger"], [["joy"], ["joy"]], ["selfemo/meld"] * 2, ["meld"] * 2)
    >>> out["selfemo/meld"]["accuracy"], out["selfemo/meld"]["weighted_f1"]
    (0.5, 0.6666666666666666)
    """
    groups: dict[str, list[int]] = {}
    for i, source in enumerate(data_sources):
        groups.setdefault(source, []).append(i)
    out = {}
    for source, rows in groups.items():
        spaces = {label_spaces[i] for i in rows}
        if len(spaces) != 1:
            raise ValueError(f"data source {source!r} mixes label spaces {sorted(spaces)}")
        m = corpus_metrics([predictions[i] for i in rows], [golds[i] for i in rows], spaces.pop())
        out[source] = {k: m[k] for k in ("n", "accuracy", "weighted_f1", "macro_f1", "parse_failure_rate",
                                         "classes_predicted", "majority_accuracy", "majority_weighted_f1")}
    return out


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; nan for a single value).

    >>> mean_sd([1.0, 3.0])
    (2.0, 1.4142135623730951)
    """
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def native(value):
    """A numpy scalar as its Python value (parquet indices), anything else unchanged."""
    return value.item() if hasattr(value, "item") else value


def read_gold(path) -> Gold:
    """Gold labels and indices of a prepare_erc.py parquet; InputError naming file and row on a bad one."""
    import pandas as pd

    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    frame = pd.read_parquet(path, columns=["data_source", "reward_model", "extra_info"])
    if frame.empty or frame["extra_info"].iloc[0]["label_space"] not in LABEL_SPACES:
        raise InputError(f"{path}:row 0: no rows, or a label space not in {sorted(LABEL_SPACES)}")
    source, space = frame["data_source"].iloc[0], frame["extra_info"].iloc[0]["label_space"]
    indices, labels = [], []
    for row, (row_source, reward, extra) in enumerate(frame.itertuples(index=False)):
        gold = list(reward["ground_truth"])
        if (row_source, extra["label_space"]) != (source, space):
            raise InputError(f"{path}:row {row}: data source or label space differs from row 0 ({source}, {space})")
        if len(gold) != 1 or gold[0] not in LABEL_SPACES[space]:
            raise InputError(f"{path}:row {row}: expected one gold label of {list(LABEL_SPACES[space])}, got {gold!r}")
        indices.append(native(extra["index"]))
        labels.append(gold[0])
    if len(set(indices)) != len(indices):
        raise InputError(f"{path}: extra_info.index is not unique")
    return Gold(path, source, space, tuple(indices), tuple(labels))


def _prediction_record(line: str, where: str) -> tuple:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: malformed JSON ({err.msg})") from None
    if not isinstance(record, dict) or "index" not in record or not isinstance(record.get("output"), str):
        raise InputError(f'{where}: expected {{"index": ..., "output": "<text>"}}')
    return record["index"], record["output"]


def read_predictions(path, known_indices) -> dict:
    """{index: output} from a predictions JSONL; rejects malformed lines, duplicates and unknown ids."""
    path, known, out = str(path), set(known_indices), {}
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            index, output = _prediction_record(line, f"{path}:{number}")
            if index not in known:
                raise InputError(f"{path}:{number}: index {index!r} is not in the test parquet")
            if index in out:
                raise InputError(f"{path}:{number}: duplicate index {index!r}")
            out[index] = output
    return out


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
    """Name the checkpoint each run evaluated when it was chosen on val (`evaluate generate --selection`)."""
    chosen = [f"- {r['run']}: round {c['round']}, global step {c['step']}, val weighted-F1 "
              f"{_pct(c['val_weighted_f1'])} %, {c['path']}" for r in runs if (c := r.get("checkpoint"))]
    return ["", "Model selection on val (best val weighted-F1 over all rounds):", *chosen] if chosen else []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="score a predictions JSONL against a test parquet")
    for flag in ("--predictions", "--data", "--out"):
        s.add_argument(flag, required=True)
    s.add_argument("--name", default=None, help="method name in results_row.md (default: the out dir name)")
    s.add_argument("--backbone", default="–")
    from selfemo_verl.eval_generate import add_model_arguments  # the flags live beside the code that reads them
    for command in ("generate", "consistency"):
        add_model_arguments(sub.add_parser(command, help=f"{command} with a model (vLLM or HF)"), command)
    r = sub.add_parser("report", help="mean ± sd and a comparison table over run dirs holding metrics.json")
    r.add_argument("runs", nargs="+")
    r.add_argument("--out", default="eval_report.md", help="markdown path (a .json summary is written beside)")
    return parser


def _run(args) -> None:
    if args.command == "score":
        metrics = score(args.predictions, args.data, args.out, args.name, args.backbone)
        print(results_row(metrics), end="")
    elif args.command == "report":
        markdown, summary = report(args.runs)
        atomic_write(args.out, markdown)
        atomic_write(Path(args.out).with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
        print(markdown, end="")
    else:
        from selfemo_verl import eval_generate
        getattr(eval_generate, f"run_{args.command}")(args)


def main(argv=None) -> int:
    """CLI entry point; a bad input file prints one line to stderr and returns 2."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # run the package module's main, so eval_generate's InputError is the one caught
    from selfemo_verl import evaluate

    sys.exit(evaluate.main())
