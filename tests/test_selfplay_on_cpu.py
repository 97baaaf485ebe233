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


def test_infra_error_is_1_for_a_server_failure_and_for_any_missing_judge_sample():
    rec = SelfPlayRecord("meld", "self_play")
    rec.infra_fail("recognize: server error RuntimeError: down")
    assert rec.as_fields()["infra_error"] == 1  # reason: the recognizer's call never answered
    turn = SelfPlayTurn("Ross")
    turn.read_judge(["<emotion>joy</emotion>", None, "<emotion>joy</emotion>"], "meld")
    rec = SelfPlayRecord("meld", "self_play", "<emotion>joy</emotion>", [turn])
    # reason: one of three judge samples never came back; the other two still vote
    assert rec.as_fields()["infra_error"] == 1 and rec.as_fields()["judged_status"] == "ok"
    later = SelfPlayTurn("Rachel")
    later.read_judge([None], "meld")
    rec = SelfPlayRecord("meld", "self_play", "<emotion>joy</emotion>", [SelfPlayTurn("Ross"), later])
    assert rec.as_fields()["infra_error"] == 1  # reason: a later turn's judge counts too


def test_policy_failures_keep_infra_error_0():
    rec = SelfPlayRecord("meld", "self_play", "")  # empty answer
    rec.fail("respond: empty generation")
    turn = SelfPlayTurn("Ross")
    turn.read_answer("<emotion>jo", "meld")  # cut answer
    turn.read_judge([""], "meld")  # the judge's empty answer is the model's
    rec.turns.append(turn)
    fields = rec.as_fields()
    assert fields["infra_error"] == 0 and type(fields["infra_error"]) is int
    assert (fields["pred_status"], fields["stated_status"], fields["judged_status"]) == ("empty", "no_tag", "empty")


def test_an_infra_reason_replaces_a_policy_reason_and_the_first_infra_reason_wins():
    rec = SelfPlayRecord("meld", "self_play")
    rec.fail("recognize: empty generation")
    rec.infra_fail("judge: 1/1 samples failed: aborted")
    rec.infra_fail("respond: server error")
    rec.fail("respond: rollout.response_length reached")
    assert rec.as_fields()["error"] == "judge: 1/1 samples failed: aborted"
