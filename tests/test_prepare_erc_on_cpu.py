"""data_prep/prepare_erc.py + selfemo_verl.data.erc_data, erc_download: raw ERC -> parquet (docs/method.md §13).

The three datasets are prepared once per session (about 2 s in all); bad-input cases run on small copies.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from selfemo_verl.data import erc_data
from selfemo_verl.data import parquet as dataset_parquet
from selfemo_verl.data.erc_data import RAW_FILES, SPLITS
from selfemo_verl.data.erc_download import REPO_DIRS, download
from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.prompts import recognize_messages

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "data_prep" / "prepare_erc.py"
EXPECTED_ROWS = {  # the standard splits (docs/method.md §13.3)
    "meld": {"train": 9989, "val": 1109, "test": 2610},
    "emorynlp": {"train": 7551, "val": 954, "test": 984},
    "iemocap": {"train": 5163, "val": 647, "test": 1623},
}


def _load_cli():
    spec = importlib.util.spec_from_file_location("prepare_erc", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_erc = _load_cli()


def _run(dataset: str, raw: Path, out: Path, *extra: str) -> int:
    return prepare_erc.main(["--dataset", dataset, "--raw-dir", str(raw), "--out-dir", str(out), *extra])


@pytest.fixture(scope="session")
def prepared(data_dir, tmp_path_factory) -> dict[str, Path]:
    """dataset -> out dir with {train,val,test}.parquet written by the CLI from ../shared/data."""
    outs = {}
    for dataset in EXPECTED_ROWS:
        outs[dataset] = tmp_path_factory.mktemp(f"prepared_{dataset}")
        assert _run(dataset, data_dir / dataset, outs[dataset]) == 0
    return outs


def _rows(prepared, dataset: str, split: str) -> list[dict]:
    return pq.read_table(prepared[dataset] / f"{split}.parquet").to_pylist()


# ---------------------------------------------------------------- the real datasets


@pytest.mark.parametrize("dataset", sorted(EXPECTED_ROWS))
def test_row_counts_equal_the_standard_splits(prepared, dataset):
    counts = {split: pq.read_metadata(prepared[dataset] / f"{split}.parquet").num_rows for split in SPLITS}
    assert counts == EXPECTED_ROWS[dataset]


def test_meld_known_row_end_to_end(prepared):
    # train_sent_emo.csv line 14 (Sr No. 13): Dialogue_ID 0, Utterance_ID 12, Chandler, "Really?!", surprise;
    # the next line is The Interviewer, "Absolutely.  You can relax", neutral. Dialogue 0 is the first, so index 12.
    row = _rows(prepared, "meld", "train")[12]
    extra = row["extra_info"]
    assert (extra["dialogue_id"], extra["turn"], extra["speaker"]) == ("0", 12, "Chandler")
    assert row["reward_model"] == {"style": "rule", "ground_truth": ["surprise"]}
    assert (extra["next_speaker"], extra["next_gold"]) == ("The Interviewer", ["neutral"])
    # reason: 13 turns so far (0..12), window 12 -> the first turn drops out; the next turn is never shown.
    assert len(extra["window"]) == 12
    assert extra["window"][0] == {"speaker": "The Interviewer", "text": "You must’ve had your hands full."}
    assert extra["window"][-1] == {"speaker": "Chandler", "text": "Really?!"}
    user = row["prompt"][1]["content"]
    assert "Chandler: No don’t I beg of you!" in user
    assert "The Interviewer: You must’ve had your hands full." in user
    assert "point person" not in user and "You can relax" not in user
    assert "What emotion(s) does Chandler express in the last turn?" in user
    assert row["prompt"] == recognize_messages(extra["window"], "meld")
    assert (row["data_source"], row["ability"], row["agent_name"]) == (
        "selfemo/meld", "emotion_recognition", "selfemo_self_play")
    assert (extra["split"], extra["index"], extra["label_space"], extra["origin"], extra["round"]) == (
        "train", 12, "meld", "real", 0)


@pytest.mark.parametrize("dataset", sorted(EXPECTED_ROWS))
def test_windows_are_past_only_and_next_fields_match_the_following_turn(prepared, dataset):
    for split in SPLITS:
        rows = _rows(prepared, dataset, split)
        assert [r["extra_info"]["index"] for r in rows] == list(range(len(rows)))
        assert {r["agent_name"] for r in rows} == {erc_data.AGENT_NAMES[split]}
        for row, nxt in zip(rows, rows[1:] + [None]):
            extra = row["extra_info"]
            assert len(extra["window"]) == min(extra["turn"] + 1, 12)
            assert extra["window"][-1]["speaker"] == extra["speaker"]
            assert set(row["reward_model"]["ground_truth"]) <= set(LABEL_SPACES[dataset])
            same_dialogue = nxt is not None and nxt["extra_info"]["dialogue_id"] == extra["dialogue_id"]
            if same_dialogue:  # reason: the next row's target is this row's next turn
                assert nxt["extra_info"]["turn"] == extra["turn"] + 1
                assert extra["next_speaker"] == nxt["extra_info"]["speaker"]
                assert extra["next_gold"] == nxt["reward_model"]["ground_truth"]
                assert nxt["extra_info"]["window"][-2] == extra["window"][-1]
            else:  # reason: the last turn of a dialogue has no next turn
                assert (extra["next_speaker"], extra["next_gold"]) == ("", [])


def test_built_rows_have_exactly_the_parquet_schema_keys():
    # reason: pyarrow drops dict keys missing from the schema, so check the builder's dicts, not the file
    dialogue = erc_data.Dialogue("d", (erc_data.Turn("A", "Hi.", "joy"), erc_data.Turn("B", "Bye.", "fear")))
    rows = erc_data.build_rows([dialogue], "meld", "val", window=1)
    schema = dataset_parquet.PARQUET_SCHEMA
    for row in rows:
        assert list(row) == schema.names
        assert list(row["extra_info"]) == schema.field("extra_info").type.names
        assert list(row["reward_model"]) == schema.field("reward_model").type.names
    # reason: window=1 shows the target turn only
    windows = [r["extra_info"]["window"] for r in rows]
    assert windows == [[{"speaker": "A", "text": "Hi."}], [{"speaker": "B", "text": "Bye."}]]


def test_meld_text_is_clean_utf8_and_speakers_are_names(prepared):
    rows = _rows(prepared, "meld", "test")
    text = "\n".join(r["prompt"][1]["content"] for r in rows)
    assert "’" in text  # reason: the CSVs use curly apostrophes
    assert "â€" not in text and "\x92" not in text
    assert {r["extra_info"]["speaker"] for r in rows} >= {"Chandler", "Monica", "Ross"}


def test_emorynlp_joins_several_speakers_and_matches_the_cosmic_json(prepared, data_dir):
    rows = _rows(prepared, "emorynlp", "train")
    joined = {r["extra_info"]["speaker"] for r in rows if " & " in r["extra_info"]["speaker"]}
    assert "Monica Geller & Phoebe Buffay" in joined
    assert all(r["extra_info"]["speaker"][0] not in "[\"'" for r in rows)
    # reason: the per_erc JSON is an independent copy keyed "<season>_<episode>_<scene>" with turns in order
    cosmic = json.loads((data_dir / "emorynlp" / "emorynlp.train.json").read_text())
    ours: dict[str, list[str]] = {}
    for r in rows:
        ours.setdefault(r["extra_info"]["dialogue_id"], []).append(r["reward_model"]["ground_truth"][0])
    assert ours == {k: [LABEL_SPACES["emorynlp"][i] for i in v["labels"]] for k, v in cosmic.items()}
    keys = [tuple(map(int, k.split("_"))) for k in ours]
    assert keys == sorted(keys)  # reason: dialogues ordered by (Season, Episode, Scene_ID)


def test_iemocap_speakers_are_mapped_and_labels_follow_the_id_order(prepared, data_dir):
    rows = _rows(prepared, "iemocap", "val")
    assert {r["extra_info"]["speaker"] for r in rows} == {"Speaker_M", "Speaker_F"}
    raw = json.loads((data_dir / "iemocap" / "iemocap.valid.json").read_text())
    first = sorted(raw)[0]
    gold = [LABEL_SPACES["iemocap"][i] for i in raw[first]["labels"]]
    got = [r["reward_model"]["ground_truth"][0] for r in rows if r["extra_info"]["dialogue_id"] == first]
    assert got == gold


def test_two_runs_write_byte_identical_parquet(prepared, data_dir, tmp_path):
    assert _run("emorynlp", data_dir / "emorynlp", tmp_path) == 0
    for split in SPLITS:
        name = f"{split}.parquet"
        assert (tmp_path / name).read_bytes() == (prepared["emorynlp"] / name).read_bytes()


def test_stats_prints_a_summary_per_split_and_the_label_table(data_dir, tmp_path, capsys):
    assert _run("iemocap", data_dir / "iemocap", tmp_path, "--stats") == 0
    out = capsys.readouterr().out
    assert "iemocap/test: 1623 rows, 31 dialogues" in out
    # reason: test has 381 frustrated of 1623 = 23.5 % (docs/method.md §13.3)
    assert any(line.split()[:2] == ["frustrated", "1296"] and "381 ( 23.5%)" in line for line in out.splitlines())


# ---------------------------------------------------------------- bad input


@pytest.fixture
def mini_meld(data_dir, tmp_path) -> Path:
    """A MELD raw dir with the first 20 lines of each official CSV."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in RAW_FILES["meld"].values():
        lines = (data_dir / "meld" / name).read_bytes().split(b"\n")[:20]
        (raw / name).write_bytes(b"\n".join(lines) + b"\n")
    return raw


def _edit(path: Path, old: bytes, new: bytes, line: int | None = None) -> None:
    lines = path.read_bytes().split(b"\n")
    targets = range(len(lines)) if line is None else [line - 1]
    for i in targets:
        lines[i] = lines[i].replace(old, new)
    path.write_bytes(b"\n".join(lines))


FIRST_TEST_UTTERANCE = "Why do all you’re coffee mugs have numbers on the bottom?".encode()  # line 2
MELD_CASES = {  # case -> (edit of test_sent_emo.csv, text the one-line error must contain)
    "missing_file": (lambda p: p.unlink(), "test_sent_emo.csv: raw file not found"),
    "wrong_columns": (lambda p: _edit(p, b"Emotion", b"Emo", line=1), "missing columns ['Emotion']"),
    "unknown_label": (
        lambda p: _edit(p, b",neutral,", b",bored,", line=4), "test_sent_emo.csv:4: unknown label 'bored'"),
    "not_utf8": (lambda p: _edit(p, "’".encode(), b"\x92"), "test_sent_emo.csv:2: not valid UTF-8"),
    "mojibake": (
        lambda p: _edit(p, "’".encode(), "â€™".encode()), "test_sent_emo.csv:2: utterance looks mis-decoded"),
    "no_rows": (lambda p: p.write_bytes(p.read_bytes().split(b"\n")[0] + b"\n"), "test_sent_emo.csv: no utterances"),
    "empty_utterance": (lambda p: _edit(p, FIRST_TEST_UTTERANCE, b" ", line=2), "test_sent_emo.csv:2: empty utterance"),
}


def _assert_failed_cleanly(rc, capsys, out: Path, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert "\n" not in err and expected in err, err
    assert not out.exists() or list(out.iterdir()) == []  # no parquet, no temp file
    return err


@pytest.mark.parametrize("case", sorted(MELD_CASES))
def test_bad_meld_file_exits_2_with_one_line_and_writes_nothing(case, mini_meld, tmp_path, capsys):
    edit, expected = MELD_CASES[case]
    assert _run("meld", mini_meld, tmp_path / "ok") == 0  # reason: the unedited copy is valid
    capsys.readouterr()
    edit(mini_meld / "test_sent_emo.csv")
    _assert_failed_cleanly(_run("meld", mini_meld, tmp_path / "out"), capsys, tmp_path / "out", expected)


def test_bad_emorynlp_speaker_cell_names_file_and_line(data_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(data_dir / "emorynlp", raw, ignore=shutil.ignore_patterns("*.json", "*.pkl"))
    (raw / "emorynlp_dev_final.csv").chmod(0o644)
    _edit(raw / "emorynlp_dev_final.csv", b"['", b"[", line=2)
    rc = _run("emorynlp", raw, tmp_path / "out")
    _assert_failed_cleanly(rc, capsys, tmp_path / "out", "emorynlp_dev_final.csv:2: Speaker")


@pytest.mark.parametrize("record,expected", [
    ({"labels": [], "sentences": [], "genders": []}, ": empty dialogue"),
    ({"labels": [9], "sentences": ["Hi."], "genders": ["M"]}, " turn 0: unknown label 9"),
    ({"labels": [1], "sentences": ["Hi."], "genders": ["X"]}, " turn 0: speaker 'X'"),
])
def test_bad_iemocap_dialogue_exits_2_naming_file_and_dialogue(record, expected, data_dir, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in RAW_FILES["iemocap"].values():
        shutil.copyfile(data_dir / "iemocap" / name, raw / name)
    test = raw / "iemocap.test.json"
    data = json.loads(test.read_text())
    data["Ses05X_broken"] = record
    test.write_text(json.dumps(data))
    rc = _run("iemocap", raw, tmp_path / "out")
    _assert_failed_cleanly(rc, capsys, tmp_path / "out", f"iemocap.test.json: dialogue 'Ses05X_broken'{expected}")


def test_write_failure_on_a_later_split_leaves_no_parquet(mini_meld, tmp_path, capsys, monkeypatch):
    calls = []
    real = dataset_parquet.pq.write_table

    def failing_write(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        real(table, where, **kw)

    monkeypatch.setattr(dataset_parquet.pq, "write_table", failing_write)
    rc = _run("meld", mini_meld, tmp_path / "out")
    _assert_failed_cleanly(rc, capsys, tmp_path / "out", "cannot write parquet (disk full)")
    assert len(calls) == 2  # reason: train was encoded, val failed before any file was written


def test_cli_process_exits_2_with_one_stderr_line(tmp_path):
    # reason: the real process, not main(): exit status and stderr as a shell sees them
    proc = subprocess.run(
        [sys.executable, str(CLI), "--dataset", "iemocap", "--raw-dir", str(tmp_path), "--out-dir",
         str(tmp_path / "out"), "--download"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "USC" in proc.stderr and "--raw-dir" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- download


@pytest.fixture
def fake_repo(data_dir, tmp_path) -> Path:
    """A folder laid out like declare-lab/MELD with the official CSVs (served through file://)."""
    repo = tmp_path / "repo"
    for dataset, sub in REPO_DIRS.items():
        (repo / sub).mkdir(parents=True)
        for name in RAW_FILES[dataset].values():
            shutil.copyfile(data_dir / dataset / name, repo / sub / name)
    return repo


@pytest.mark.parametrize("dataset", sorted(REPO_DIRS))
def test_download_from_a_file_url_fetches_verified_copies(dataset, fake_repo, data_dir, tmp_path):
    raw = tmp_path / "raw"
    paths = download(dataset, raw, fake_repo.as_uri())
    assert sorted(p.name for p in raw.iterdir()) == sorted(RAW_FILES[dataset].values())
    for path in paths:
        assert path.read_bytes() == (data_dir / dataset / path.name).read_bytes()
    # reason: verified files already present are kept, so a dead base URL is not contacted
    assert download(dataset, raw, (tmp_path / "nowhere").as_uri()) == paths


def test_download_with_a_sha256_mismatch_exits_2_and_keeps_nothing(fake_repo, tmp_path, capsys):
    with open(fake_repo / "data" / "MELD" / "dev_sent_emo.csv", "ab") as f:
        f.write(b"tampered\n")
    raw, out = tmp_path / "raw", tmp_path / "out"
    rc = _run("meld", raw, out, "--download", "--base-url", fake_repo.as_uri())
    err = _assert_failed_cleanly(rc, capsys, out, "data/MELD/dev_sent_emo.csv: sha256")
    assert "does not match" in err
    assert sorted(p.name for p in raw.iterdir()) == ["train_sent_emo.csv"]  # reason: fetched before dev failed


def test_download_of_a_missing_url_exits_2(tmp_path, capsys):
    rc = _run("emorynlp", tmp_path / "raw", tmp_path / "out", "--download", "--base-url", (tmp_path / "x").as_uri())
    _assert_failed_cleanly(rc, capsys, tmp_path / "out", "emorynlp_train_final.csv: download failed")
