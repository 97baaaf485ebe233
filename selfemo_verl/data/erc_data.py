"""Raw ERC datasets -> one verl parquet row per target utterance (docs/method.md §13).

Core module: no verl, no ray. Three readers turn the raw files of MELD, EmoryNLP and IEMOCAP into a common
list of `Dialogue`s per split; `build_rows` turns dialogues into rows (`data.parquet.PARQUET_SCHEMA`);
`write_splits` writes the three parquet files atomically and byte-deterministically. Any problem with a user's
file raises `ErcDataError` with a one-line message naming the file (and line or dialogue where known).

Sources (where they come from and their licences: docs/method.md §13.2):
- MELD: the official `{train,dev,test}_sent_emo.csv` (UTF-8; the pickle/JSON copies are mis-decoded).
  Dialogue = Dialogue_ID, turns ordered by Utterance_ID; dialogue_id = str(Dialogue_ID).
- EmoryNLP (multimodal subset): `emorynlp_{train,dev,test}_final.csv`. Dialogue = (Season, Episode, Scene_ID),
  turns ordered by Utterance_ID; dialogue_id = "<season>_<episode>_<scene>" (the COSMIC id). The Speaker cell
  is a Python list literal; several speakers are joined with " & ".
- IEMOCAP: the COSMIC split as per_erc JSON `iemocap.{train,valid,test}.json` (labels are ids 0-5 in
  LABEL_SPACES["iemocap"] order). Speakers are only a gender, so "M" -> "Speaker_M", "F" -> "Speaker_F"
  (Assumption: neutral readable names; per_erc's invented names are not reproduced).

`turn` is the 0-based position of the utterance in its (ordered) dialogue; MELD and EmoryNLP ids have gaps.
Texts and names are stripped of surrounding whitespace; an empty one, or one that looks mis-decoded
(cp1252/latin-1 mojibake such as "â€™" or "\\x92"), is an error rather than a silent fix.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from selfemo_verl.data.parquet import PARQUET_SCHEMA, parquet_bytes
from selfemo_verl.files import atomic_write_all
from selfemo_verl.labels import LABEL_SPACES, data_source
from selfemo_verl.prompts import recognize_messages

SPLITS = ("train", "val", "test")
RAW_FILES: dict[str, dict[str, str]] = {
    "meld": {"train": "train_sent_emo.csv", "val": "dev_sent_emo.csv", "test": "test_sent_emo.csv"},
    "emorynlp": {
        "train": "emorynlp_train_final.csv", "val": "emorynlp_dev_final.csv", "test": "emorynlp_test_final.csv",
    },
    "iemocap": {"train": "iemocap.train.json", "val": "iemocap.valid.json", "test": "iemocap.test.json"},
}
IEMOCAP_SPEAKERS = {"M": "Speaker_M", "F": "Speaker_F"}
AGENT_NAMES = {"train": "selfemo_self_play", "val": "selfemo_recognize", "test": "selfemo_recognize"}
ABILITY = "emotion_recognition"
DEFAULT_WINDOW = 12

_MELD_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
_EMORY_COLUMNS = ("Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode")
# cp1252 text decoded as latin-1 (C1 controls such as \x92) or UTF-8 decoded as cp1252 ("â€™", "Ã©").
_MOJIBAKE = re.compile("[\x80-\x9f]|â€|Ã[\x80-\xbf]")


class ErcDataError(ValueError):
    """A bad raw file or output problem; the message is one line naming the file (and line) at fault."""


@dataclass(frozen=True)
class Turn:
    speaker: str
    text: str
    label: str


@dataclass(frozen=True)
class Dialogue:
    dialogue_id: str
    turns: tuple[Turn, ...]


# ---------------------------------------------------------------- reading helpers


def _read_text(path: Path) -> str:
    """The file decoded as strict UTF-8 (a BOM is dropped); raise ErcDataError naming file and line."""
    if not path.is_file():
        raise ErcDataError(f"{path}: raw file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ErcDataError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start]:#04x}); re-save as UTF-8") from None


def _clean(value: str, what: str, where: str) -> str:
    """`value` stripped; raise if it is empty or looks mis-decoded."""
    value = value.strip()
    if not value:
        raise ErcDataError(f"{where}: empty {what}")
    bad = _MOJIBAKE.search(value)
    if bad:
        raise ErcDataError(f"{where}: {what} looks mis-decoded ({bad.group()!r} in {value[:40]!r}); use the UTF-8 CSV")
    return value


def _label(word: str, dataset: str, where: str) -> str:
    """The canonical label `word` (exact match); raise naming the valid ones."""
    word = word.strip()
    if word not in LABEL_SPACES[dataset]:
        raise ErcDataError(f"{where}: unknown label {word!r}; expected one of {list(LABEL_SPACES[dataset])}")
    return word


def _int(value: str, column: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ErcDataError(f"{where}: {column} {value!r} is not an integer") from None


def _csv_records(path: Path, columns: tuple[str, ...]):
    """Yield (where, row) for each data row; check the header and the field count."""
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise ErcDataError(f"{path}: missing columns {missing}; found {reader.fieldnames}")
    count = 0
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or None in row.values():
            raise ErcDataError(f"{where}: row has a different number of fields than the header")
        count += 1
        yield where, row
    if count == 0:
        raise ErcDataError(f"{path}: no utterances")


def _group(keyed: list[tuple[tuple, int, str, Turn]], path: Path) -> list[Dialogue]:
    """Sort (dialogue key, utterance id, dialogue_id, turn) records into dialogues; reject duplicate ids."""
    keyed.sort(key=lambda rec: (rec[0], rec[1]))
    dialogues: dict[tuple, tuple[str, list[Turn]]] = {}
    previous = None
    for key, utt_id, dialogue_id, turn in keyed:
        if (key, utt_id) == previous:
            raise ErcDataError(f"{path}: duplicate utterance id {utt_id} in dialogue {dialogue_id}")
        previous = (key, utt_id)
        dialogues.setdefault(key, (dialogue_id, []))[1].append(turn)
    return [Dialogue(did, tuple(turns)) for did, turns in dialogues.values()]


# ---------------------------------------------------------------- the three readers


def read_meld(path: Path) -> list[Dialogue]:
    """MELD `*_sent_emo.csv` -> dialogues ordered by Dialogue_ID, turns by Utterance_ID."""
    keyed = []
    for where, row in _csv_records(path, _MELD_COLUMNS):
        dialogue = _int(row["Dialogue_ID"], "Dialogue_ID", where)
        turn = Turn(
            speaker=_clean(row["Speaker"], "speaker", where),
            text=_clean(row["Utterance"], "utterance", where),
            label=_label(row["Emotion"], "meld", where),
        )
        keyed.append(((dialogue,), _int(row["Utterance_ID"], "Utterance_ID", where), str(dialogue), turn))
    return _group(keyed, path)


def _emory_speaker(cell: str, where: str) -> str:
    """"['Monica Geller', 'Ross Geller']" -> "Monica Geller & Ross Geller"."""
    try:
        names = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        names = None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ErcDataError(f"{where}: Speaker {cell!r} is not a non-empty list of names")
    return " & ".join(_clean(name, "speaker", where) for name in names)


def read_emorynlp(path: Path) -> list[Dialogue]:
    """EmoryNLP `emorynlp_*_final.csv` -> dialogues ordered by (Season, Episode, Scene_ID), turns by Utterance_ID."""
    keyed = []
    for where, row in _csv_records(path, _EMORY_COLUMNS):
        key = tuple(_int(row[c], c, where) for c in ("Season", "Episode", "Scene_ID"))
        turn = Turn(
            speaker=_emory_speaker(row["Speaker"], where),
            text=_clean(row["Utterance"], "utterance", where),
            label=_label(row["Emotion"], "emorynlp", where),
        )
        keyed.append((key, _int(row["Utterance_ID"], "Utterance_ID", where), "_".join(map(str, key)), turn))
    return _group(keyed, path)


def _iemocap_dialogue(dialogue_id: str, record, path: Path) -> Dialogue:
    where = f"{path}: dialogue {dialogue_id!r}"
    fields = record if isinstance(record, dict) else {}
    columns = [fields.get(k) for k in ("labels", "sentences", "genders")]
    if not all(isinstance(c, list) for c in columns):
        raise ErcDataError(f"{where}: needs lists 'labels', 'sentences', 'genders'")
    labels, sentences, genders = columns
    if not sentences or not len(labels) == len(sentences) == len(genders):
        raise ErcDataError(f"{where}: empty dialogue or unequal lengths {len(labels)}/{len(sentences)}/{len(genders)}")
    space = LABEL_SPACES["iemocap"]
    turns = []
    for i, (label, text, gender) in enumerate(zip(labels, sentences, genders)):
        at = f"{where} turn {i}"
        if type(label) is not int or not 0 <= label < len(space):
            raise ErcDataError(f"{at}: unknown label {label!r}; expected an id 0-{len(space) - 1}")
        if gender not in IEMOCAP_SPEAKERS or not isinstance(text, str):
            raise ErcDataError(f"{at}: speaker {gender!r} not in {sorted(IEMOCAP_SPEAKERS)} or text not a string")
        turns.append(Turn(IEMOCAP_SPEAKERS[gender], _clean(text, "utterance", at), space[label]))
    return Dialogue(dialogue_id, tuple(turns))


def read_iemocap(path: Path) -> list[Dialogue]:
    """per_erc `iemocap.*.json` ({dlg_id: {labels, sentences, genders}}) -> dialogues sorted by id."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ErcDataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not data:
        raise ErcDataError(f"{path}: expected a non-empty object {{dialogue_id: {{labels, sentences, genders}}}}")
    return [_iemocap_dialogue(did, data[did], path) for did in sorted(data)]


READERS = {"meld": read_meld, "emorynlp": read_emorynlp, "iemocap": read_iemocap}


def read_split(dataset: str, raw_dir: str | os.PathLike, split: str) -> list[Dialogue]:
    """The dialogues of one split (`train`, `val`, `test`) of `dataset` from its raw file in `raw_dir`."""
    return READERS[dataset](Path(raw_dir) / RAW_FILES[dataset][split])


# ---------------------------------------------------------------- rows


def make_row(dialogue: Dialogue, turn: int, dataset: str, split: str, index: int, window: int) -> dict:
    """The parquet row for target `dialogue.turns[turn]`: the last `window` turns up to it (past only).

    >>> d = Dialogue("7", (Turn("Ross", "Hi.", "neutral"), Turn("Rachel", "Oh, hi!", "joy")))
    >>> row = make_row(d, 0, "meld", "train", 0, 12)
    >>> row["reward_model"], row["extra_info"]["next_speaker"], row["extra_info"]["next_gold"]
    ({'style': 'rule', 'ground_truth': ['neutral']}, 'Rachel', ['joy'])
    """
    target = dialogue.turns[turn]
    past = dialogue.turns[max(0, turn + 1 - window) : turn + 1]
    ctx = [{"speaker": t.speaker, "text": t.text} for t in past]
    nxt = dialogue.turns[turn + 1] if turn + 1 < len(dialogue.turns) else None
    extra = {
        "split": split, "index": index, "dialogue_id": dialogue.dialogue_id, "turn": turn,
        "speaker": target.speaker, "next_speaker": nxt.speaker if nxt else "",
        "next_gold": [nxt.label] if nxt else [], "label_space": dataset, "origin": "real", "round": 0,
        "window": ctx,
    }
    return {
        "data_source": data_source(dataset),
        "prompt": recognize_messages(ctx, dataset),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": [target.label]},
        "extra_info": extra,
        "agent_name": AGENT_NAMES[split],
    }


def build_rows(dialogues, dataset: str, split: str, window: int = DEFAULT_WINDOW) -> list[dict]:
    """One row per utterance, dialogues and turns in the given order; `index` = 0..n-1 in that order."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    rows: list[dict] = []
    for dialogue in dialogues:
        for turn in range(len(dialogue.turns)):
            rows.append(make_row(dialogue, turn, dataset, split, len(rows), window))
    return rows


# ---------------------------------------------------------------- stats


def label_counts(rows: list[dict], dataset: str) -> dict[str, int]:
    """Gold-label counts in LABEL_SPACES order (every label present, zeros included)."""
    counts = Counter(label for row in rows for label in row["reward_model"]["ground_truth"])
    return {label: counts[label] for label in LABEL_SPACES[dataset]}


def split_summary(split: str, rows: list[dict], dataset: str) -> str:
    """One line: rows, dialogues, label distribution (%)."""
    n = len(rows)
    dialogues = len({row["extra_info"]["dialogue_id"] for row in rows})
    dist = " ".join(f"{k}={v / max(n, 1):.1%}" for k, v in label_counts(rows, dataset).items())
    return f"{dataset}/{split}: {n} rows, {dialogues} dialogues | {dist}"


def stats_table(rows_by_split: dict[str, list[dict]], dataset: str) -> str:
    """Label distribution table: one line per label, count and % per split."""
    counts = {s: label_counts(rows, dataset) for s, rows in rows_by_split.items()}
    header = f"{'label':<12}" + "".join(f"{s:>18}" for s in rows_by_split)
    lines = [header]
    for label in LABEL_SPACES[dataset]:
        cells = "".join(
            f"{counts[s][label]:>9} ({counts[s][label] / max(len(rows_by_split[s]), 1):>6.1%})" for s in rows_by_split
        )
        lines.append(f"{label:<12}{cells}")
    lines.append(f"{'total':<12}" + "".join(f"{len(rows):>9} {'':>8}" for rows in rows_by_split.values()))
    return "\n".join(lines)


# ---------------------------------------------------------------- parquet


def write_splits(rows_by_split: dict[str, list[dict]], out_dir: str | os.PathLike) -> list[Path]:
    """Write OUT/<split>.parquet for every split, all or nothing: every split is encoded (`parquet.parquet_bytes`,
    deterministic bytes, `PARQUET_SCHEMA`) before the first file is written, and the files are renamed into place
    only after all of them are written (`files.atomic_write_all`).
    """
    out = Path(out_dir)
    try:
        files = {out / f"{split}.parquet": parquet_bytes(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA))
                 for split, rows in rows_by_split.items()}
        atomic_write_all(files)
    except OSError as err:
        raise ErcDataError(f"{out}: cannot write parquet ({err})") from None
    return list(files)
