"""selfemo_verl.data.flywheel and data_prep/flywheel.py: round r's dumps + D_r -> D_{r+1} (docs/method.md §7).

Property tests run `build_next_round` on a small base built with erc_data (the real row schema) and random
episode records, against expectations written out here from the module docstring's rules (loop references and
hand-built rows, never the module's own helpers); file tests run the CLI; one wiring test reads the output with
verl's RLHFDataset.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfemo_verl import files as atomic_files
from selfemo_verl.data import flywheel
from selfemo_verl.data.episode_dump import EpisodeRecord, write_step
from selfemo_verl.data.erc_data import Dialogue, Turn, build_rows
from selfemo_verl.data.flywheel import FlywheelConfig, build_next_round, synthetic_check, synthetic_row
from selfemo_verl.data.parquet import PARQUET_SCHEMA
from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.prompts import format_dialogue, recognize_messages
from selfemo_verl.rewards import smoothed_iou

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "data_prep" / "flywheel.py"
MELD = LABEL_SPACES["meld"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_cli():
    spec = importlib.util.spec_from_file_location("flywheel_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_cli()


def make_base(window: int = 3) -> list[dict]:
    """Two dialogues, 7 rows, real schema; turns 'Hi.' repeat so dedupe has work; window 3."""
    d1 = Dialogue("1", (Turn("Ross", "Hi.", "neutral"), Turn("Rachel", "Oh my God!", "surprise"),
                        Turn("Ross", "I got the job.", "joy"), Turn("Rachel", "No way.", "surprise")))
    d2 = Dialogue("2", (Turn("Ross", "Hi.", "neutral"), Turn("Monica", "Go away.", "anger"),
                        Turn("Ross", "Fine.", "sadness")))
    return build_rows([d1, d2], "meld", "train", window)


BASE = make_base()
N_BASE = len(BASE)


def _gold(index: int) -> list[str]:
    return BASE[index]["reward_model"]["ground_truth"]


def _mostly(good, *bad):
    """Draw `good` 7 times in 8 (so that passing episodes are common), else one of `bad`."""
    return st.sampled_from([good] * 7 * max(1, len(bad)) + list(bad))


_labels = st.one_of(st.lists(st.sampled_from(MELD), min_size=1, max_size=3),
                    st.lists(st.sampled_from([*MELD, "Joy", "happy"]), max_size=3))  # reason: 2 non-canonical words
_fields = st.fixed_dictionaries(
    {"label_space": _mostly("meld", "iemocap"),
     "pred": _labels, "pred_status": _mostly("ok", "no_tag", "truncated", None),  # reason: None = key absent
     "stated": _labels, "stated_status": _mostly("ok", "no_tag"),
     "judged": _labels, "judged_status": _mostly("ok", "empty"),
     "reply": st.sampled_from(["Great!", "great!", "I know.", "No way.", "Hi.", "  "]),
     "judge_agreement": st.sampled_from([0.0, 0.34, 0.5, 0.67, 1.0, 1.0, 1.0, None])},
    optional={"infra_error": st.sampled_from([0, 0, 1])},
)


def _selfemo_of(fields: dict, consistent: bool) -> dict:
    sp = {k: v for k, v in fields.items() if not (k == "pred_status" and v is None)}
    return {**sp, "judged": sp["stated"]} if consistent else sp


@st.composite
def _record(draw) -> EpisodeRecord:
    index = draw(st.integers(0, N_BASE))  # reason: N_BASE is unknown
    # reason: a consistent judge (judged == stated) half of the time, so synthetic rows are common, not rare
    sp = _selfemo_of(draw(_fields), draw(st.booleans()))
    if index < N_BASE and draw(st.booleans()):  # reason: an exact recognition half of the time, so easy rows occur
        sp["pred"] = list(_gold(index))
    r_rec = draw(st.sampled_from([0.0, 0.25, 0.5, 0.7, 1.0, None]))  # reason: a decoy; the flywheel must not read it
    return EpisodeRecord(draw(st.integers(0, 3)), "u", index, draw(_mostly("selfemo/meld", "selfemo/iemocap")), sp,
                         {"r_rec": r_rec})


_records = st.lists(_record(), min_size=4, max_size=30)
_config = st.builds(
    FlywheelConfig, round=st.integers(1, 3), tau_con=st.sampled_from([0.5, 1.0]),
    min_agreement=st.sampled_from([0.0, 0.5, 1.0]), max_synthetic_share=st.sampled_from([0.0, 0.2, 0.5, 0.5, 1.0]),
    hard_range=st.sampled_from([(0.2, 0.8), (0.2, 0.8), (0.0, 0.5), (0.5, 1.0)]),
    hard_copies=st.sampled_from([1, 2, 3]), easy_keep_prob=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 3),
)


def _without_index(row: dict) -> dict:
    return {**row, "extra_info": {**row["extra_info"], "index": None}}


def _key(window: list[dict], labels) -> str:
    """Rule 3's dedupe key written out: the window's `Speaker: text` lines, NFKC, casefolded, whitespace runs -> one
    space, then "||" and the sorted labels joined by ","."""
    text = " ".join(unicodedata.normalize("NFKC", format_dialogue(window)).casefold().split())
    return text + "||" + ",".join(sorted(labels))


def _row_key(row: dict) -> str:
    return _key(row["extra_info"]["window"], row["reward_model"]["ground_truth"])


def _u(seed: int, *parts) -> float:
    """Rule 2's u written out: the first 8 bytes of SHA-256 of seed and parts joined by \\x1f, over 2**64."""
    digest = hashlib.sha256("\x1f".join(str(x) for x in (seed, *parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _usable(rec: EpisodeRecord) -> bool:
    """The record belongs to a base row (index, data_source) and no infrastructure failure hit it."""
    return (rec.index < N_BASE and BASE[rec.index]["data_source"] == rec.data_source
            and rec.selfemo.get("infra_error") != 1)


def _passes(rec: EpisodeRecord, cfg: FlywheelConfig) -> bool:
    """Loop reference for the synthetic filter (module docstring rule 1)."""
    sp = rec.selfemo
    if not _usable(rec):
        return False
    agreement = sp.get("judge_agreement")
    return (sp["label_space"] == "meld" and BASE[rec.index]["extra_info"]["next_speaker"] != ""
            and sp["stated_status"] == sp["judged_status"] == "ok" and sp["reply"].strip() != ""
            and len(sp["stated"]) > 0 and set(sp["stated"]) <= set(MELD)
            and smoothed_iou(set(sp["judged"]), set(sp["stated"]), "meld") >= cfg.tau_con
            and agreement is not None and agreement >= cfg.min_agreement)


def _expected_synthetic(rec: EpisodeRecord, cfg: FlywheelConfig) -> dict:
    """Rule 1's row written out by hand: window = parent window + {parent's next_speaker, reply} cut to the longest
    base window (3), prompt = recognize_messages(window, "meld"), sorted stated labels, the parent's extra_info with
    turn + 1, the new speaker, no next speaker/gold, origin "synthetic" and this round (index left out)."""
    parent, sp = BASE[rec.index], rec.selfemo
    info = parent["extra_info"]
    window = [*info["window"], {"speaker": info["next_speaker"], "text": sp["reply"].strip()}][-3:]
    return {
        "data_source": "selfemo/meld", "ability": parent["ability"], "agent_name": "selfemo_self_play",
        "prompt": recognize_messages(window, "meld"),
        "reward_model": {"style": "rule", "ground_truth": sorted(set(sp["stated"]))},
        "extra_info": {**info, "index": None, "turn": info["turn"] + 1, "speaker": info["next_speaker"],
                       "next_speaker": "", "next_gold": [], "origin": "synthetic", "round": cfg.round,
                       "window": window},
    }


def _expected_real_rows(records, cfg: FlywheelConfig) -> list[dict]:
    """Loop reference for rules 2 and 3 on the base rows: each episode scores (|P & G| + eps) / (|P | G| + eps) if
    its pred parsed, else 0 (no pred_status: skipped); a row's copies follow the mean over its key's episodes."""
    scores = defaultdict(list)
    for rec in records:
        if _usable(rec) and "pred_status" in rec.selfemo:
            pred, gold = set(rec.selfemo["pred"]), set(_gold(rec.index))
            ok = rec.selfemo["pred_status"] == "ok"
            scores[_row_key(BASE[rec.index])].append((len(pred & gold) + cfg.eps) / (len(pred | gold) + cfg.eps)
                                                     if ok else 0.0)
    lo, hi = cfg.hard_range
    out, seen = [], set()
    for row in BASE:
        key = _row_key(row)
        if key in seen:
            continue
        seen.add(key)
        mean = sum(scores[key]) / len(scores[key]) if scores[key] else None
        if mean is None:
            copies = 1
        elif lo <= mean <= hi:
            copies = cfg.hard_copies
        else:
            copies = 1 if _u(cfg.seed, "downsample", key) < cfg.easy_keep_prob else 0
        out += [_without_index(row)] * copies
    return out


@SETTINGS
@given(records=_records, cfg=_config)
def test_every_output_row_is_a_base_row_or_a_synthetic_row_of_a_passing_episode(records, cfg):
    rows, _ = build_next_round(BASE, records, cfg)
    base = [_without_index(r) for r in BASE]
    allowed = [_expected_synthetic(r, cfg) for r in records if _passes(r, cfg)]
    for row in rows:
        assert _without_index(row) in base or _without_index(row) in allowed


@SETTINGS
@given(records=_records, cfg=_config)
def test_real_rows_follow_the_difficulty_rule_on_beta_zero_scores(records, cfg):
    rows, _ = build_next_round(BASE, records, cfg)
    real = [_without_index(r) for r in rows if r["extra_info"]["origin"] == "real"]
    assert real == _expected_real_rows(records, cfg)  # reason: the synthetic cap never drops a real row


@SETTINGS
@given(records=_records, cfg=_config)
def test_provenance_is_complete_and_indices_are_renumbered(records, cfg):
    rows, _ = build_next_round(BASE, records, cfg)
    assert [r["extra_info"]["index"] for r in rows] == list(range(len(rows)))
    by_dialogue_turn = {(r["extra_info"]["dialogue_id"], r["extra_info"]["turn"]): r for r in BASE}
    for row in rows:
        info = row["extra_info"]
        assert set(info) == set(BASE[0]["extra_info"]) and set(row) == set(BASE[0])
        assert info["origin"] in ("real", "synthetic")
        if info["origin"] == "synthetic":
            parent = by_dialogue_turn[(info["dialogue_id"], info["turn"] - 1)]  # parent = (dialogue_id, turn - 1)
            assert info["round"] == cfg.round and info["speaker"] == parent["extra_info"]["next_speaker"]
            assert info["next_speaker"] == "" and info["next_gold"] == []
            assert len(info["window"]) == min(len(parent["extra_info"]["window"]) + 1, 3)  # reason: base window 3
            assert info["window"][:-1] == parent["extra_info"]["window"][-len(info["window"]) + 1:]
            assert row["prompt"] == recognize_messages(info["window"], "meld")
            assert row["agent_name"] == "selfemo_self_play"


@SETTINGS
@given(records=_records, cfg=_config)
def test_synthetic_share_and_copy_counts_respect_the_caps(records, cfg):
    rows, summary = build_next_round(BASE, records, cfg)
    n_syn = sum(r["extra_info"]["origin"] == "synthetic" for r in rows)
    assert n_syn <= cfg.max_synthetic_share * len(rows) + 1e-9
    keys = [_row_key(r) for r in rows]
    assert max((keys.count(k) for k in keys), default=0) <= cfg.hard_copies
    assert summary["output"] == {"rows": len(rows), "real": len(rows) - n_syn, "synthetic": n_syn,
                                 "synthetic_share": round(n_syn / len(rows), 6) if rows else 0.0}


@SETTINGS
@given(records=_records, cfg=_config)
def test_same_inputs_give_the_same_rows_and_summary(records, cfg):
    assert build_next_round(BASE, records, cfg) == build_next_round(BASE, list(records), cfg)


@SETTINGS
@given(cfg=_config)
def test_without_episodes_the_flywheel_only_dedupes_and_is_idempotent(cfg):
    once, summary = build_next_round(BASE, [], cfg)
    twice, _ = build_next_round(once, [], cfg)
    assert once == twice
    assert summary["base"] == {"duplicate": 1, "kept_unseen": N_BASE - 1}  # reason: "Ross: Hi." opens both dialogues
    assert [_without_index(r) for r in once] == [_without_index(r) for r in BASE if r is not BASE[4]]


def _ep(index: int, pred: list[str] | None = None, r_rec: float = 1.0, **selfemo) -> EpisodeRecord:
    """An episode on BASE[index]: recognition `pred` (default: the gold, exact), a passing first self-play turn."""
    gold = _gold(index) if index < N_BASE else ["neutral"]
    sp = {"label_space": "meld", "pred": gold if pred is None else pred, "pred_status": "ok",
          "stated": ["joy"], "stated_status": "ok", "judged": ["joy"], "judged_status": "ok",
          "reply": "Congrats!", "judge_agreement": 1.0, "infra_error": 0, **selfemo}
    return EpisodeRecord(0, f"u{index}", index, "selfemo/meld", sp, {"r_rec": r_rec})


def test_hard_rows_are_doubled_and_unseen_rows_kept_once():
    # reason: row 1 (gold surprise) scores anger 0.1 / 2.1 = 0.048 and surprise 1.0: mean 0.52, in [0.2, 0.8];
    # the others have no episode
    recs = [_ep(1, ["anger"], stated_status="no_tag"), _ep(1, stated_status="no_tag")]
    rows, summary = build_next_round(BASE, recs, FlywheelConfig(round=1))
    turns = [(r["extra_info"]["dialogue_id"], r["extra_info"]["turn"]) for r in rows]
    assert turns == [("1", 0), ("1", 1), ("1", 1), ("1", 2), ("1", 3), ("2", 1), ("2", 2)]
    assert summary["base"] == {"duplicate": 1, "kept_hard": 1, "kept_unseen": 5}
    assert summary["synthetic"] == {"stated_unparsed": 2}


def test_easy_and_hopeless_rows_are_kept_iff_their_seeded_hash_is_below_keep_prob():
    # reason: odd rows answered exactly (1.0: easy), even rows with fear, no row's gold (0.048: hopeless)
    recs = [_ep(i, None if i % 2 else ["fear"], stated_status="no_tag") for i in range(N_BASE)]
    cfg = FlywheelConfig(round=1, seed=7)
    rows, summary = build_next_round(BASE, recs, cfg)
    expected = [r for i, r in enumerate(BASE) if i != 4 and _u(7, "downsample", _row_key(r)) < 0.5]
    assert [_without_index(r) for r in rows] == [_without_index(r) for r in expected]
    assert 0 < len(rows) < N_BASE - 1  # reason: with this seed the rule both keeps and drops (else the test is empty)
    assert sum(v for k, v in summary["base"].items() if k.startswith(("kept_", "downsampled_"))) == N_BASE - 1


def test_a_row_recognised_exactly_is_easy_even_when_its_dumped_r_rec_says_hard():
    # reason: pred == gold scores 1.0 at beta = 0 (> 0.8: easy); the dumped r_rec 0.7 of a beta > 0 run (what the
    # pre-revision beta = 0.3 sIoU gave an exact hit) would have said hard, and is not read
    recs = [_ep(1, r_rec=0.7, stated_status="no_tag"), _ep(1, r_rec=0.7, stated_status="no_tag")]
    rows, summary = build_next_round(BASE, recs, FlywheelConfig(round=1, easy_keep_prob=1.0))
    assert summary["base"] == {"duplicate": 1, "kept_easy": 1, "kept_unseen": 5}
    assert len(rows) == N_BASE - 1  # reason: no copy


@pytest.mark.parametrize("pred, status", [
    ([], "no_tag"),
    (["surprise"], "truncated"),  # reason: the gold label, but in an answer cut by its budget: the policy's failure
])
def test_an_unparsed_prediction_scores_zero_whatever_the_runs_r_invalid(pred, status):
    # reason: a run with r_invalid = 0.25 dumped r_rec = 0.25 (hard); the flywheel scores 0.0 < 0.2: hopeless
    recs = [_ep(1, pred, r_rec=0.25, pred_status=status, stated_status="no_tag")]
    _, summary = build_next_round(BASE, recs, FlywheelConfig(round=1, easy_keep_prob=1.0))
    assert summary["base"] == {"duplicate": 1, "kept_hopeless": 1, "kept_unseen": 5}


def test_a_record_without_pred_status_is_counted_and_scores_nothing():
    sp = {k: v for k, v in _ep(1).selfemo.items() if k != "pred_status"}
    rec = EpisodeRecord(0, "u1", 1, "selfemo/meld", sp, {"r_rec": 0.5})
    _, summary = build_next_round(BASE, [rec], FlywheelConfig(round=1))
    assert summary["inputs"]["no_pred"] == 1
    assert summary["base"] == {"duplicate": 1, "kept_unseen": N_BASE - 1}  # reason: row 1 is unseen, not scored
    assert summary["synthetic"] == {"passed": 1}  # reason: its self-play turn is still the model's and passes


def test_infra_error_episodes_are_counted_and_used_for_neither_difficulty_nor_synthetic_rows():
    # reason: counted, the infra episode would make row 1's mean (1.0 + 0.048) / 2 = 0.52 (hard, 2 copies) and add
    # a second synthetic row; left out, row 1 is easy (1.0, kept once with keep prob 1) with one synthetic row
    recs = [_ep(1, reply="Told you."), _ep(1, ["fear"], reply="The server said so.", infra_error=1)]
    rows, summary = build_next_round(BASE, recs, FlywheelConfig(round=1, easy_keep_prob=1.0))
    assert summary["inputs"]["infra_error"] == 1
    assert summary["base"] == {"duplicate": 1, "kept_easy": 1, "kept_unseen": 5}
    assert summary["synthetic"] == {"passed": 1}
    assert [r["extra_info"]["window"][-1]["text"] for r in rows if r["extra_info"]["origin"] == "synthetic"] == [
        "Told you."]


def test_synthetic_row_extends_the_window_up_to_the_longest_base_window():
    parent = BASE[2]  # "I got the job." window = 3 turns, next speaker Rachel
    row = synthetic_row(parent, "  No way!  ", ["joy", "surprise"], 2, max_window=3)
    reply = {"speaker": "Rachel", "text": "No way!"}
    assert row["extra_info"]["window"] == [*parent["extra_info"]["window"][1:], reply]
    # reason: a parent at a dialogue's start (window of 1) keeps its context
    first = synthetic_row(BASE[0], "Hey.", ["neutral"], 1, max_window=3)["extra_info"]["window"]
    assert first == [{"speaker": "Ross", "text": "Hi."}, {"speaker": "Rachel", "text": "Hey."}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": ["joy", "surprise"]}
    assert (row["extra_info"]["dialogue_id"], row["extra_info"]["turn"], row["extra_info"]["round"]) == ("1", 3, 2)
    assert parent["extra_info"]["window"][0]["text"] == "Hi."  # reason: the parent row is not mutated


@pytest.mark.parametrize("index, selfemo, reason", [
    (0, {"judged": ["anger"]}, "inconsistent"),                  # reason: sIoU({anger},{joy}) = 0.048 < 1
    (0, {"judged": ["joy", "surprise"]}, "inconsistent"),        # reason: 0.524 < 1
    (0, {"judge_agreement": 0.34}, "low_agreement"),
    (0, {"judge_agreement": None}, "no_judge_agreement"),
    (0, {"stated_status": "too_many"}, "stated_unparsed"),
    (0, {"judged_status": "no_tag"}, "judged_unparsed"),
    (0, {"stated": ["joy", "Happy"]}, "unknown_label"),         # reason: model output, not canonical
    (0, {"reply": " \n"}, "no_reply"),
    (3, {}, "no_next_speaker"),                                  # reason: row 3 ends dialogue 1
    (0, {"label_space": "iemocap"}, "label_space_mismatch"),
])
def test_each_failing_episode_is_dropped_with_its_reason(index, selfemo, reason):
    assert synthetic_check(_ep(index, **selfemo).selfemo, BASE[index], FlywheelConfig(round=1)) == (None, reason)
    _, summary = build_next_round(BASE, [_ep(index, **selfemo)], FlywheelConfig(round=1))
    assert summary["synthetic"] == {reason: 1}


def test_a_missing_stated_status_means_the_responder_did_not_run():
    sp = {k: v for k, v in _ep(0).selfemo.items() if k != "stated_status"}
    assert synthetic_check(sp, BASE[0], FlywheelConfig(round=1)) == (None, "no_response")


def test_episodes_of_unknown_rows_or_other_data_sources_are_counted_not_used():
    recs = [_ep(N_BASE), EpisodeRecord(0, "u", 0, "selfemo/iemocap", _ep(0).selfemo, {"r_rec": 0.5})]
    rows, summary = build_next_round(BASE, recs, FlywheelConfig(round=1))
    assert summary["inputs"]["unknown_index"] == 1 and summary["inputs"]["data_source_mismatch"] == 1
    assert len(rows) == N_BASE - 1


def test_duplicate_synthetic_rows_are_dropped_and_the_cap_is_exact():
    # reason: 6 distinct passing replies on row 0 (+1 duplicate); 6 real rows; share 0.25 -> floor(0.25*6/0.75) = 2
    half = ["joy", "neutral"]  # reason: gold neutral, score 1.1 / 2.1 = 0.52 -> row 0 is hard, 2 copies
    recs = [_ep(0, half, reply=f"Reply {i}") for i in range(6)] + [_ep(0, half, reply="reply 0")]
    rows, summary = build_next_round(BASE, recs, FlywheelConfig(round=1, max_synthetic_share=0.25))
    assert summary["synthetic"] == {"passed": 6, "duplicate": 1, "synthetic_cap": 4}
    n_syn = sum(r["extra_info"]["origin"] == "synthetic" for r in rows)
    assert (len(rows) - n_syn, n_syn) == (7, 2)  # reason: 6 real + 1 hard copy = 7 real -> floor(0.25*7/0.75) = 2


@pytest.mark.parametrize("kwargs, match", [
    ({"round": 0}, "--round must be >= 1"),
    ({"round": 1, "hard_range": (0.8, 0.2)}, "lo <= hi"),
    ({"round": 1, "max_synthetic_share": 1.5}, "max-synthetic-share"),
    ({"round": 1, "hard_copies": 0}, "hard-copies"),
])
def test_bad_options_are_flywheel_errors(kwargs, match):
    with pytest.raises(flywheel.FlywheelError, match=match):
        build_next_round(BASE, [], FlywheelConfig(**kwargs))


# ---------------------------------------------------------------- files and CLI


@pytest.fixture
def files(tmp_path):
    """A base parquet (real schema) and a dump dir with 2 steps (3 passing synthetic episodes, 2 hard rows)."""
    base = tmp_path / "d0.parquet"
    pq.write_table(pa.Table.from_pylist(BASE, schema=PARQUET_SCHEMA), base)
    dumps = tmp_path / "dumps"
    write_step(dumps, 0, [_ep(0, ["fear"]), _ep(0, reply="Hey you.")])  # reason: (0.048 + 1) / 2 = 0.52, hard
    write_step(dumps, 1, [_ep(1, ["surprise", "joy"], judged=["anger"]), _ep(2, reply="Wow, congrats!")])
    return base, dumps, tmp_path / "out" / "d1.parquet"


def _args(base, dumps, out, *extra):
    return ["--dumps", str(dumps), "--base", str(base), "--out", str(out), "--round", "1", *extra]


def test_cli_output_is_byte_identical_on_rerun_and_has_the_base_schema(files, tmp_path, capsys):
    base, dumps, out = files
    assert cli.main(_args(base, dumps, out)) == 0
    first = out.read_bytes()
    again = tmp_path / "again.parquet"
    assert cli.main(_args(base, dumps, again)) == 0
    assert again.read_bytes() == first
    capsys.readouterr()
    assert cli.main(_args(base, dumps, out)) == 0 and out.read_bytes() == first  # reason: overwrite is stable too
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == PARQUET_SCHEMA
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert summary["output"]["rows"] == table.num_rows and summary["synthetic"]["passed"] == 3
    assert json.loads(capsys.readouterr().out) == summary  # reason: the summary is printed as well


def test_a_failed_rename_keeps_the_old_output_and_leaves_no_temp_file(files, monkeypatch):
    base, dumps, out = files
    out.parent.mkdir()
    out.write_bytes(b"previous round output")

    def killed(src, dst):  # reason: simulates a kill between the write and the rename
        raise OSError("killed before rename")

    monkeypatch.setattr(atomic_files.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        cli.main(_args(base, dumps, out))
    assert out.read_bytes() == b"previous round output"
    assert [p.name for p in out.parent.iterdir()] == ["d1.parquet"]


def test_corrupt_dump_lines_are_warned_and_counted_in_the_summary(files):
    base, dumps, out = files
    with open(dumps / "step_000001.jsonl", "a") as f:
        f.write('{"step": 1, "uid": \n')
    with pytest.warns(UserWarning, match="skipped 1 corrupt episode line"):
        assert cli.main(_args(base, dumps, out)) == 0
    assert json.loads(Path(f"{out}.summary.json").read_text())["inputs"]["corrupt_lines"] == 1


def _rewrite(base: Path, rows=None, schema=PARQUET_SCHEMA, drop=None):
    table = pa.Table.from_pylist(rows or BASE, schema=schema)
    pq.write_table(table.drop_columns(drop) if drop else table, base)


@pytest.mark.parametrize("breakage, message", [
    (lambda b: b.unlink(), r"d0\.parquet: base parquet not found"),
    (lambda b: b.write_bytes(b"PAR1 not really"), r"d0\.parquet: not a readable parquet file"),
    (lambda b: _rewrite(b, drop=["agent_name"]), r"d0\.parquet: base parquet lacks column\(s\) \['agent_name'\]"),
    (lambda b: _rewrite(b, rows=[BASE[0], {**BASE[1], "reward_model": {"style": "rule", "ground_truth": ["happy"]}}]),
     r"d0\.parquet: row 1: ground_truth \['happy'\] is not a non-empty list of meld labels"),
    (lambda b: _rewrite(b, rows=[BASE[0], BASE[0]]),
     r"d0\.parquet: row 1: extra_info.index 0 is missing or not unique"),
])
def test_bad_base_parquet_is_one_line_naming_file_and_row_exit_2(files, capsys, breakage, message):
    base, dumps, out = files
    breakage(base)
    assert cli.main(_args(base, dumps, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flywheel: error: ")
    assert re.search(message, err)
    assert not out.parent.exists()  # reason: nothing half-written


def test_missing_dump_dir_and_bad_option_exit_2(files, capsys):
    base, dumps, out = files
    assert cli.main(_args(base, dumps.parent / "nope", out)) == 2
    assert cli.main(_args(base, dumps, out, "--max-synthetic-share", "2")) == 2
    err = capsys.readouterr().err.splitlines()
    assert "episode dump directory not found" in err[0] and "--max-synthetic-share must be in [0, 1]" in err[1]


def test_cli_script_runs_on_real_meld_and_verl_reads_the_output(data_dir, tmp_path):
    """Wiring: prepare_erc on MELD -> dumps -> `python data_prep/flywheel.py` -> verl 0.9.1 RLHFDataset."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    prep = [sys.executable, str(REPO / "data_prep" / "prepare_erc.py"), "--dataset", "meld",
            "--raw-dir", str(data_dir / "meld"), "--out-dir", str(tmp_path / "meld")]
    subprocess.run(prep, check=True, capture_output=True, env=env)
    base = tmp_path / "meld" / "train.parquet"
    real = pq.read_table(base).slice(0, 3).to_pylist()
    # reason: gold + one wrong label scores (1 + 0.1) / (2 + 0.1) = 0.52: every row is hard
    recs = [EpisodeRecord(0, "u", r["extra_info"]["index"], "selfemo/meld",
                          _ep(0, [*gold, next(x for x in MELD if x not in gold)]).selfemo, {"r_rec": 0.5})
            for r in real for gold in [r["reward_model"]["ground_truth"]]]
    write_step(tmp_path / "dumps", 0, recs)
    outputs = []
    for hash_seed in ("1", "2"):  # reason: byte-identical across processes, whatever Python's hash seed
        outputs.append(tmp_path / f"d1_{hash_seed}.parquet")
        run = subprocess.run([sys.executable, str(CLI), *_args(base, tmp_path / "dumps", outputs[-1])],
                             capture_output=True, text=True, env={**env, "PYTHONHASHSEED": hash_seed})
        assert run.returncode == 0, run.stderr[-2000:]
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    out = outputs[0]
    summary = json.loads(run.stdout)
    assert summary["synthetic"] == {"passed": 3} and summary["base"]["kept_hard"] == 3

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from selfemo_verl.cpu.assets import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    cfg = OmegaConf.create({"cache_dir": str(tmp_path / "verl"), "filter_overlong_prompts": False,
                            "prompt_key": "prompt"})
    ds = RLHFDataset(str(out), tok, cfg)
    assert len(ds) == summary["output"]["rows"]
    last = ds[len(ds) - 1]  # reason: synthetic rows come last
    assert last["extra_info"]["origin"] == "synthetic" and last["raw_prompt"][-1]["role"] == "user"
