"""Dataset parquet files (docs/method.md §13): the row schema, its one writer, and the checked reader of a base D_r.

Core module: no verl, no ray. One row per target utterance in verl's RLHF schema, `PARQUET_SCHEMA`:
`data.erc_data` builds the rows of D_0 and `data.flywheel` those of D_{r+1}; both, and the CPU experiment's
subsets (`selfemo_verl.experiment`), write through `parquet_bytes`. Bytes are deterministic: a fixed schema
without pandas metadata, zstd level 3, one row group, no timestamps (parquet stores none; `created_by` names
only the pyarrow version). `read_base` reads a round's training parquet D_r for the flywheel and checks it
row by row; a bad one raises `BaseParquetError` with one line naming the file (and row).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from selfemo_verl.files import atomic_write
from selfemo_verl.labels import LABEL_SPACES

_TURN = pa.struct([("speaker", pa.string()), ("text", pa.string())])
PARQUET_SCHEMA = pa.schema([
    ("data_source", pa.string()),
    ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    ("ability", pa.string()),
    ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.list_(pa.string()))])),
    ("extra_info", pa.struct([
        ("split", pa.string()), ("index", pa.int64()), ("dialogue_id", pa.string()), ("turn", pa.int64()),
        ("speaker", pa.string()), ("next_speaker", pa.string()), ("next_gold", pa.list_(pa.string())),
        ("label_space", pa.string()), ("origin", pa.string()), ("round", pa.int64()),
        ("window", pa.list_(_TURN)),
    ])),
    ("agent_name", pa.string()),
])
COLUMNS = tuple(PARQUET_SCHEMA.names)  # every column a base parquet must have
EXTRA_KEYS = tuple(PARQUET_SCHEMA.field("extra_info").type.names)  # every extra_info key a base parquet must have
ORIGINS = ("real", "synthetic")  # extra_info.origin: a dataset utterance, or a flywheel row (§7.3)


class BaseParquetError(ValueError):
    """A bad base parquet (missing, unreadable, a column or key missing, a bad row); one line naming file and row."""


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as parquet bytes, deterministically: zstd level 3, one row group.

    >>> empty = PARQUET_SCHEMA.empty_table()
    >>> parquet_bytes(empty) == parquet_bytes(empty), pq.read_table(pa.BufferReader(parquet_bytes(empty))).num_rows
    (True, 0)
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", compression_level=3, row_group_size=1 << 30)
    return sink.getvalue().to_pybytes()


def write_parquet(path, table: pa.Table) -> None:
    """Write `table` to `path` as `parquet_bytes`, atomically (`files.atomic_write`)."""
    atomic_write(path, parquet_bytes(table))


def _check_schema(schema, path) -> None:
    """Base parquet columns and extra_info keys (docs/method.md §13); raise naming what is missing."""
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise BaseParquetError(f"{path}: base parquet lacks column(s) {missing}; found {schema.names}")
    extra = schema.field("extra_info").type
    names = [extra.field(i).name for i in range(extra.num_fields)] if pa.types.is_struct(extra) else []
    lacking = [k for k in EXTRA_KEYS if k not in names]
    if lacking:
        raise BaseParquetError(f"{path}: base parquet extra_info lacks key(s) {lacking}; found {names}")


def _row_problem(row: dict, seen_index: set) -> str | None:
    """What is wrong with one base row, or None."""
    info = row["extra_info"] or {}
    space, index, window = info.get("label_space"), info.get("index"), info.get("window")
    gold = (row["reward_model"] or {}).get("ground_truth")
    if space not in LABEL_SPACES:
        return f"unknown label_space {space!r}; expected one of {sorted(LABEL_SPACES)}"
    if not isinstance(index, int) or index in seen_index:
        return f"extra_info.index {index!r} is missing or not unique"
    if not isinstance(gold, list) or not gold or not set(gold) <= set(LABEL_SPACES[space]):
        return f"ground_truth {gold!r} is not a non-empty list of {space} labels {list(LABEL_SPACES[space])}"
    if not isinstance(window, list) or not window or not all(isinstance(t, dict) and "speaker" in t for t in window):
        return "extra_info.window is not a non-empty list of {speaker, text} turns"
    if info.get("origin") not in ORIGINS or not isinstance(info.get("turn"), int):
        return f"extra_info.origin {info.get('origin')!r} not in {ORIGINS} or turn not an int"
    return None


def read_base(path) -> tuple[list[dict], pa.Schema]:
    """Rows and schema (metadata dropped) of the round's training parquet, validated row by row."""
    path = Path(path)
    if not path.is_file():
        raise BaseParquetError(f"{path}: base parquet not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise BaseParquetError(f"{path}: not a readable parquet file ({' '.join(str(err).split())})") from None
    _check_schema(table.schema, path)
    rows, seen = table.to_pylist(), set()
    if not rows:
        raise BaseParquetError(f"{path}: base parquet has no rows")
    for i, row in enumerate(rows):
        problem = _row_problem(row, seen)
        if problem:
            raise BaseParquetError(f"{path}: row {i}: {problem}")
        seen.add(row["extra_info"]["index"])
    return rows, table.schema.remove_metadata()
