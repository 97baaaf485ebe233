"""Episode dumps: one JSONL file per training step, written atomically, read back with corrupt lines counted.

Core module: no verl, no ray. The trainer (adapter) calls `write_step` once per step; the flywheel
(`selfemo_verl.data.flywheel`, docs/method.md §7) calls `read_dumps` on the round's dump directory.

Format (agreed with the lead; docs/method.md §7.1): `DIR/step_{step:06d}.jsonl`, one line per episode, keys sorted:

    {"data_source": "selfemo/meld",  # the row's data_source
     "index": 17,                    # the row's extra_info.index in the parquet this round trains on
     "rewards": {"r_con": 1.0, "r_rec": 1.0, "r_und": 0.0, "score": 1.5, ...},  # reward_extra_info values
     "selfemo": {...},               # the agent loop's extra_fields["selfemo"] (see selfemo_verl/reward_fn.py)
     "step": 3,                      # global training step
     "uid": "a1b2..."}               # verl's group id (the n episodes of one prompt share it)

Values are made JSON-safe on write: numpy scalars/arrays become Python numbers/lists, sets and frozensets
become sorted lists, tuples become lists, and a non-finite float (NaN, ±inf) becomes null (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from selfemo_verl.files import atomic_write

_STEP_FILE = re.compile(r"^step_(\d{6,})\.jsonl$")
_FIELDS = {"step": int, "uid": str, "index": int, "data_source": str, "selfemo": dict, "rewards": dict}


@dataclass(frozen=True)
class EpisodeRecord:
    """One dumped self-play episode (one line of a step file)."""

    step: int
    uid: str
    index: int
    data_source: str
    selfemo: dict
    rewards: dict


def step_path(dump_dir, step: int) -> Path:
    """The file of one training step.

    >>> step_path("dumps", 7).as_posix()
    'dumps/step_000007.jsonl'
    """
    return Path(dump_dir) / f"step_{int(step):06d}.jsonl"


def _jsonable(value):
    """Recursively convert numpy values, sets and tuples to JSON types; non-finite floats become None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array (and torch tensors): to Python, then recurse
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def encode_record(record: EpisodeRecord) -> str:
    """One JSON line (no newline), keys sorted, compact, UTF-8 text kept as is.

    >>> encode_record(EpisodeRecord(1, "u", 0, "selfemo/meld", {"pred": {"joy"}}, {"r_rec": float("nan")}))
    '{"data_source":"selfemo/meld","index":0,"rewards":{"r_rec":null},"selfemo":{"pred":["joy"]},"step":1,"uid":"u"}'
    """
    return json.dumps(_jsonable(asdict(record)), sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)


def decode_record(line: str) -> EpisodeRecord:
    """Parse one line; raise ValueError saying what is wrong (bad JSON, missing key, wrong type)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object ({type(obj).__name__})")
    for key, typ in _FIELDS.items():
        value = obj.get(key)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ValueError(f"key {key!r} missing or not {typ.__name__}")
    return EpisodeRecord(**{key: obj[key] for key in _FIELDS})


def write_step(dump_dir, step: int, records: Iterable[EpisodeRecord | Mapping]) -> Path:
    """Write all episodes of one training step to `DIR/step_{step:06d}.jsonl` atomically; return the path.

    `records` are EpisodeRecord or mappings with the same six keys (the record's own `step` is overwritten by
    `step`); a record the reader would reject (missing key, wrong type) raises ValueError before anything is
    written. Re-writing a step replaces its file. Input order is kept, so equal inputs give equal bytes.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> p = write_step(d, 2, [{"uid": "u", "index": 5, "data_source": "selfemo/meld", "selfemo": {}, "rewards": {}}])
    >>> p.name, read_dumps(d)[0][0].index
    ('step_000002.jsonl', 5)
    """
    lines = []
    for i, rec in enumerate(records):
        fields = {**(asdict(rec) if isinstance(rec, EpisodeRecord) else dict(rec)), "step": int(step)}
        line = encode_record(EpisodeRecord(**{key: fields.get(key) for key in _FIELDS}))
        try:
            decode_record(line)  # the reader's checks: a wiring bug fails here, not in the next round's flywheel
        except ValueError as err:
            raise ValueError(f"episode {i} of step {step}: {err}") from None
        lines.append(line + "\n")
    path = step_path(dump_dir, step)
    atomic_write(path, "".join(lines))
    return path


def records_from_columns(step: int, uids: Sequence, indices: Sequence, data_sources: Sequence,
                         selfemo: Sequence, rewards: Mapping[str, Sequence]) -> list[EpisodeRecord]:
    """Build a step's records from batch columns (what the trainer holds): one entry per episode in each.

    `rewards` maps a reward name (score, r_rec, r_con, r_und, ...) to its per-episode values. Raises
    ValueError when the columns have different lengths (a wiring bug, not model output).

    >>> recs = records_from_columns(1, ["u", "u"], [3, 3], ["selfemo/meld"] * 2, [{}, {}], {"r_rec": [1.0, 0.0]})
    >>> [r.rewards["r_rec"] for r in recs]
    [1.0, 0.0]
    """
    n = len(uids)
    columns = {"indices": indices, "data_sources": data_sources, "selfemo": selfemo, **rewards}
    bad = {name: len(col) for name, col in columns.items() if len(col) != n}
    if bad:
        raise ValueError(f"episode columns differ in length from uids ({n}): {bad}")
    return [
        EpisodeRecord(int(step), str(uids[i]), int(indices[i]), str(data_sources[i]),
                      dict(selfemo[i]) if isinstance(selfemo[i], Mapping) else {},
                      {name: _jsonable(col[i]) for name, col in rewards.items()})
        for i in range(n)
    ]


def step_files(dump_dir) -> list[Path]:
    """The step files of a dump directory, in step order; ValueError if `dump_dir` is not a directory."""
    root = Path(dump_dir)
    if not root.is_dir():
        raise ValueError(f"episode dump directory not found: {root}")
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FILE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def read_step_file(path) -> tuple[list[EpisodeRecord], list[tuple[int, str]]]:
    """Records of one step file and its corrupt lines as (line number, reason); never raises on content."""
    records, corrupt = [], []
    data = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = data.split("\n")  # only "\n" ends a line: str.splitlines would also split inside text at \x85, \u2028
    if lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, start=1):
        try:
            records.append(decode_record(line))
        except ValueError as err:
            corrupt.append((lineno, str(err)))
    return records, corrupt


def read_dumps(dump_dir) -> tuple[list[EpisodeRecord], int]:
    """All episodes under `dump_dir` (step files in step order, lines in file order) and the corrupt-line count.

    Every corrupt line (bad JSON, a truncated line, a missing key or a wrong type, a blank line) is skipped
    and counted; each file with corrupt lines raises one `UserWarning` naming the file and the first lines.
    """
    records, n_corrupt = [], 0
    for path in step_files(dump_dir):
        recs, corrupt = read_step_file(path)
        records.extend(recs)
        n_corrupt += len(corrupt)
        if corrupt:
            first = "; ".join(f"line {n}: {why}" for n, why in corrupt[:3])
            warnings.warn(f"{path}: skipped {len(corrupt)} corrupt episode line(s) ({first})", stacklevel=2)
    return records, n_corrupt
