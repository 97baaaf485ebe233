"""ERC evaluation metrics (docs/method.md §9): accuracy, weighted/macro-F1, parse failures, majority baseline.

Core module: no verl, no ray (sklearn is imported inside the functions that need it). The trainer's validation
hook (`selfemo_verl.trainer.corpus_val_metrics`) and the evaluation CLI (`python -m selfemo_verl.eval`) both score
with `corpus_metrics`, so a validation number and a test number mean the same thing.

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

import math
import numbers
from collections import Counter

from selfemo_verl.labels import check_label_space, parse_emotions
from selfemo_verl.rewards import mask_to_labels

FAILURE = "<parse_failure>"  # sentinel prediction: wrong for every gold, excluded from the F1 label list
MISSING = "missing"  # status of a test row with no prediction


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

    The strongest constant predictor on the rows scored (for accuracy and for weighted-F1, which a constant
    answer k scores (n_k / n) * 2 p_k / (1 + p_k) with p_k = n_k / n), so "above the majority baseline" is a fair bar.
    Assumption: ours (the ERC papers take the majority class of the training split; on MELD both are neutral).

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
