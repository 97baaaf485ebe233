"""The user's files that evaluation reads (docs/method.md §9): gold parquet, predictions JSONL, model selection.

Core module: no verl, no ray. Every reader raises `InputError` with one line naming the file (and row or line)
at fault; the CLI (`python -m selfemo_verl.eval`) prints it and exits with status 2.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from selfemo_verl.labels import LABEL_SPACES


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


def native(value):
    """A numpy scalar as its Python value (parquet indices), anything else unchanged.

    >>> import numpy as np
    >>> native(np.int64(7)), native("u7")
    (7, 'u7')
    """
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


def load_rows(path, limit=None):
    """The parquet as a DataFrame (first `limit` rows); InputError if missing or without the needed columns."""
    import pandas as pd

    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    frame = pd.read_parquet(path)
    missing = {"prompt", "extra_info"} - set(frame.columns)
    if missing:
        raise InputError(f"{path}: missing columns {sorted(missing)}")
    return frame if limit is None else frame.head(limit)


def read_selection(path) -> dict:
    """`chosen` of a `model_select select` JSON: round, step, path, val_weighted_f1; InputError if bad."""
    keys = ("round", "step", "path", "val_weighted_f1")
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        chosen = json.loads(Path(path).read_text(encoding="utf-8")).get("chosen")
    except (json.JSONDecodeError, AttributeError):
        chosen = None
    if not isinstance(chosen, dict) or any(k not in chosen for k in keys):
        raise InputError(f"{path}: expected a model_select JSON with chosen.{{{', '.join(keys)}}}")
    return {k: chosen[k] for k in keys}
