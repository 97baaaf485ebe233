"""Pure self-play episode logic (selfemo_verl/selfplay.py): speakers, the judge's majority vote, the record."""

import doctest

from hypothesis import given
from hypothesis import strategies as st

import selfemo_verl.selfplay as selfplay
from selfemo_verl.labels import LABEL_SPACES
from selfemo_verl.selfplay import (
    FALLBACK_SPEAKER,
    SelfPlayRecord,
    SelfPlayTurn,
    majority_vote,
    recent_turns,
    responder_name,
)

J, S, A = frozenset({"joy"}), frozenset({"sadness"}), frozenset({"anger"})
W = [{"speaker": "Ross", "text": "a"}, {"speaker": "Rachel", "text": "b"}, {"speaker": "Rachel", "text": "c"}]


def test_docstring_examples_hold():
    failures, tried = doctest.testmod(selfplay)
    assert tried > 0 and failures == 0


def test_majority_vote_worked_examples():
    assert majority_vote([(J, "ok")]) == (J, "ok", 1.0)                       # reason: k = 1 agrees with itself
    assert majority_vote([(J, "ok"), (S, "ok"), (S, "ok")]) == (S, "ok", 2 / 3)  # reason: plurality
    assert majority_vote([(S, "ok"), (J, "ok")]) == (S, "ok", 0.5)            # reason: tie -> first seen
    assert majority_vote([(frozenset(), "no_tag"), (J, "ok")]) == (J, "ok", 0.5)  # reason: failures do not vote
    assert majority_vote([(frozenset(), "too_many")] * 2) == (frozenset(), "too_many", 0.0)  # reason: none parsed
    assert majority_vote([]) == (frozenset(), "missing", 0.0)                 # reason: no sample came back


@given(st.lists(st.tuples(st.sampled_from([J, S, A, frozenset()]), st.sampled_from(["ok", "no_tag"])), max_size=7))
def test_majority_vote_agreement_is_the_share_of_samples_equal_to_the_winner(answers):
    winner, status, agreement = majority_vote(answers)
    assert 0.0 <= agreement <= 1.0
    if status == "ok":
        same = sum(1 for labels, s in answers if s == "ok" and labels == winner)
        assert agreement == same / len(answers)
        assert all(same >= sum(1 for lab, s in answers if s == "ok" and lab == other) for other, _ in answers)
    else:
        assert winner == frozenset() and agreement == 0.0


def test_responder_is_the_named_next_speaker_else_the_latest_other_speaker_else_a_fallback():
    assert responder_name(W, "Monica") == "Monica"
    assert responder_name(W, "  ") == "Ross"  # reason: blank name -> latest speaker other than the last one
    assert responder_name(W[1:], None) == FALLBACK_SPEAKER  # reason: Rachel only, nobody else spoke


def test_recent_turns_keeps_the_last_n_in_order():
    assert recent_turns(W, 2) == W[1:] and recent_turns(W, 0) == W and recent_turns(W, 99) == W


def test_turn_without_reply_is_judged_missing_and_record_keeps_turn_order():
    first, second = SelfPlayTurn("Ross"), SelfPlayTurn("Rachel")
    first.read_answer("<emotion>joy</emotion><reply>Yes!</reply>", "meld")
    first.read_judge(["<emotion>joy</emotion>", None], "meld")
    second.read_answer("<emotion>anger</emotion> no reply tag", "meld")  # no reply: the loop judges nothing
    rec = SelfPlayRecord("meld", "self_play", "<emotion>joy</emotion>", [first, second]).as_fields()
    assert (rec["judged"], rec["judge_agreement"]) == (["joy"], 0.5)
    assert rec["later_turns"][0]["reply_status"] == "no_tag"
    assert rec["later_turns"][0]["judged_status"] == "missing"


def test_recognize_record_has_no_turn_keys_and_a_missing_answer_is_status_missing():
    rec = SelfPlayRecord("emorynlp", "recognize").as_fields()
    assert rec["pred_status"] == "missing" and "stated_status" not in rec and rec["later_turns"] == []


@given(st.text(max_size=200) | st.binary(max_size=50) | st.none())
def test_parsing_untrusted_answers_never_raises(text):
    turn = SelfPlayTurn("Ross")
    turn.read_answer(text, "meld")
    turn.read_judge([text, text], "meld")
    fields = turn.as_fields()
    assert set(fields["stated"]) <= set(LABEL_SPACES["meld"]) and 0.0 <= fields["judge_agreement"] <= 1.0


def test_a_judge_that_never_answered_is_an_infrastructure_status_not_a_parse_failure():
    from selfemo_verl.selfplay import SelfPlayTurn

    turn = SelfPlayTurn("Ross")
    turn.read_judge([None, None], "meld")
    assert turn.judged_status == "judge_error"
    turn.read_judge([None, "<emotion>joy</emotion>"], "meld")  # reason: one sample came back and it counts
    assert (turn.judged_status, sorted(turn.judged), turn.judge_agreement) == ("ok", ["joy"], 0.5)
    turn.read_judge([""], "meld")  # reason: an empty generation is the model's answer
    assert turn.judged_status == "empty"
