"""selfemo_verl.data.episode_dump: per-step JSONL dumps, atomic writes, corrupt lines counted (docs/method.md §7.1)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfemo_verl import files
from selfemo_verl.data.episode_dump import EpisodeRecord, read_dumps, records_from_columns, step_path, write_step

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_finite = st.floats(allow_nan=False, allow_infinity=False)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), _finite, st.text(max_size=20))
_json = st.recursive(
    _json_leaf, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
    max_leaves=10)
_records = st.lists(  # st.text includes \x85 and \u2028, which str.splitlines would split on
    st.builds(EpisodeRecord, step=st.just(0), uid=st.text(max_size=12), index=st.integers(0, 10**6),
              data_source=st.text(max_size=20), selfemo=st.dictionaries(st.text(max_size=8), _json, max_size=4),
              rewards=st.dictionaries(st.text(max_size=8), _finite, max_size=4)),
    max_size=6,
)


def _rec(index=0, **kw) -> EpisodeRecord:
    fields = dict(step=0, uid="u", index=index, data_source="selfemo/meld", selfemo={"pred": ["joy"]},
                  rewards={"r_rec": 1.0})
    return EpisodeRecord(**{**fields, **kw})


@SETTINGS
@given(records=_records, step=st.integers(0, 10**6))
def test_write_then_read_returns_the_same_records(tmp_path_factory, records, step):
    d = tmp_path_factory.mktemp("dumps")
    write_step(d, step, records)
    back, n_corrupt = read_dumps(d)
    assert n_corrupt == 0
    assert back == [EpisodeRecord(**{**r.__dict__, "step": step}) for r in records]


@SETTINGS
@given(records=_records)
def test_equal_inputs_give_equal_bytes_with_sorted_keys(tmp_path_factory, records):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    assert write_step(a, 3, records).read_bytes() == write_step(b, 3, records).read_bytes()
    for line in step_path(a, 3).read_text(encoding="utf-8").split("\n")[:-1]:
        obj = json.loads(line)
        assert list(obj) == sorted(obj)  # top-level keys sorted (nested ones too: sort_keys)


def test_numpy_sets_and_non_finite_values_become_json_types(tmp_path):
    # reason: the trainer hands numpy scalars/arrays; JSON has no NaN, so the line must still be standard JSON
    rec = _rec(index=np.int64(4), selfemo={"pred": frozenset({"joy", "anger"}), "mask": np.array([1, 0])},
               rewards={"r_rec": np.float32(0.5), "r_con": float("nan"), "r_und": float("inf")})
    write_step(tmp_path, 1, [rec])
    line = step_path(tmp_path, 1).read_text()
    obj = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert obj["index"] == 4 and obj["selfemo"] == {"mask": [1, 0], "pred": ["anger", "joy"]}
    assert obj["rewards"] == {"r_con": None, "r_rec": 0.5, "r_und": None}


def test_corrupt_lines_are_counted_skipped_and_warned(tmp_path):
    write_step(tmp_path, 0, [_rec(0), _rec(1)])
    good = json.loads(step_path(tmp_path, 0).read_text().splitlines()[0])
    bad_lines = [
        '{"truncated": ',                                  # reason: a cut-off line
        "not json at all",
        "[1, 2, 3]",                                       # reason: JSON but not an object
        json.dumps({k: v for k, v in good.items() if k != "uid"}),   # reason: missing key
        json.dumps({**good, "index": "7"}),                # reason: index of the wrong type
        json.dumps({**good, "index": True}),               # reason: a bool is not an index
        json.dumps({**good, "selfemo": ["joy"]}),          # reason: selfemo must be an object
        "",                                                # reason: a blank line is not a record
    ]
    with open(step_path(tmp_path, 0), "a", encoding="utf-8") as f:
        f.write("\n".join(bad_lines) + "\n" + json.dumps({**good, "index": 9}) + "\n")
    with pytest.warns(UserWarning, match=r"step_000000\.jsonl: skipped 8 corrupt episode line\(s\) \(line 3: not JSON"):
        records, n_corrupt = read_dumps(tmp_path)
    assert n_corrupt == len(bad_lines)
    assert [r.index for r in records] == [0, 1, 9]


def test_invalid_utf8_bytes_count_as_corrupt_not_a_crash(tmp_path):
    write_step(tmp_path, 0, [_rec(0)])
    with open(step_path(tmp_path, 0), "ab") as f:
        f.write(b'{"uid": "\xff\xfe\n')
    with pytest.warns(UserWarning):
        records, n_corrupt = read_dumps(tmp_path)
    assert (len(records), n_corrupt) == (1, 1)


def test_steps_are_read_in_numeric_order_and_other_files_ignored(tmp_path):
    for step in (10, 2, 1000000):
        write_step(tmp_path, step, [_rec(step)])
    (tmp_path / ".step_000003.jsonl.123.ab.tmp").write_text("leftover temp file")  # reason: not a step file
    (tmp_path / "notes.txt").write_text("x")
    records, n_corrupt = read_dumps(tmp_path)
    assert [r.step for r in records] == [2, 10, 1000000] and n_corrupt == 0


def test_missing_dump_dir_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="episode dump directory not found: .*nowhere"):
        read_dumps(tmp_path / "nowhere")


def test_failed_rename_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    old = write_step(tmp_path, 5, [_rec(1)]).read_bytes()

    def killed(src, dst):  # reason: simulates a crash between the write and the rename
        raise KeyboardInterrupt("killed before rename")

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_step(tmp_path, 5, [_rec(2), _rec(3)])
    assert step_path(tmp_path, 5).read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005.jsonl"]


def test_rewriting_a_step_replaces_its_file(tmp_path):
    write_step(tmp_path, 5, [_rec(1), _rec(2)])
    write_step(tmp_path, 5, [_rec(3)])
    assert [r.index for r in read_dumps(tmp_path)[0]] == [3]


def test_written_files_get_umask_permissions_not_private(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    mode = write_step(tmp_path, 0, []).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # reason: Ray workers / other users read the dumps


@pytest.mark.parametrize("bad, why", [
    ({"uid": "u", "index": 1, "data_source": "d", "selfemo": {}}, "key 'rewards' missing"),
    ({"uid": "u", "index": "1", "data_source": "d", "selfemo": {}, "rewards": {}}, "key 'index' missing or not int"),
    ({"uid": "u", "index": 1, "data_source": "d", "selfemo": None, "rewards": {}}, "key 'selfemo' missing or not dict"),
])
def test_write_step_rejects_a_record_the_reader_would_skip_and_writes_nothing(tmp_path, bad, why):
    good = {"uid": "u", "index": 0, "data_source": "d", "selfemo": {}, "rewards": {}}
    with pytest.raises(ValueError, match=f"episode 1 of step 4: {why}"):
        write_step(tmp_path, 4, [good, bad])
    assert list(tmp_path.iterdir()) == []


def test_records_from_columns_builds_one_record_per_episode():
    recs = records_from_columns(
        7, np.array(["a", "a", "b"]), np.array([3, 3, 4]), ["selfemo/meld"] * 3,
        [{"pred": ["joy"]}, None, {"pred": []}], {"r_rec": np.array([1.0, 0.0, 0.5]), "score": [1, 2, 3]},
    )
    assert [(r.step, r.uid, r.index) for r in recs] == [(7, "a", 3), (7, "a", 3), (7, "b", 4)]
    assert recs[1].selfemo == {} and recs[2].rewards == {"r_rec": 0.5, "score": 3}
    assert type(recs[0].rewards["r_rec"]) is float and type(recs[0].index) is int


def test_records_from_columns_rejects_columns_of_different_length():
    with pytest.raises(ValueError, match=r"differ in length from uids \(2\): \{'r_rec': 1\}"):
        records_from_columns(0, ["a", "b"], [0, 1], ["d", "d"], [{}, {}], {"r_rec": [1.0]})
