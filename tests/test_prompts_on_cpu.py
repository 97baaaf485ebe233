"""The three role prompts and the reply parser (selfemo_verl/prompts.py, docs/method.md §6.2, §2.5)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfemo_verl.labels import LABEL_SPACES, format_emotions
from selfemo_verl.prompts import (
    MAX_REPLY_CHARS,
    format_dialogue,
    judge_messages,
    parse_reply,
    recognize_messages,
    respond_messages,
    role_switch_message,
)

WINDOW = [
    {"speaker": "Ross", "text": "I got the job at the museum."},
    {"speaker": "Rachel", "text": "Oh my God, that is amazing!"},
]


def _text(messages):
    return "\n".join(m["content"] for m in messages)


def test_recognize_prompt_shows_the_dialogue_in_order_and_asks_about_the_last_speaker():
    system, user = recognize_messages(WINDOW, "meld")
    assert (system["role"], user["role"]) == ("system", "user")
    assert "Ross: I got the job at the museum.\nRachel: Oh my God, that is amazing!" in user["content"]
    assert "What emotion(s) does Rachel express in the last turn?" in user["content"]
    assert all(label in user["content"] for label in LABEL_SPACES["meld"])
    assert "<emotion>" in user["content"]


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
def test_every_prompt_lists_the_dataset_labels_and_only_those(space):
    other = {lab for s, labs in LABEL_SPACES.items() if s != space for lab in labs} - set(LABEL_SPACES[space])
    for messages in (recognize_messages(WINDOW, space), [role_switch_message("Ross", space)],
                     judge_messages(WINDOW, "Ross", "Great.", space)):
        choices = messages[-1]["content"].split("of: ", 1)[1].split(".", 1)[0]
        listed = {c.strip() for c in choices.replace(" inside <emotion></emotion> tags;", "").split(",")}
        assert set(LABEL_SPACES[space]) <= listed
        assert not (other & listed)  # reason: no label of another dataset leaks into the choices


def test_unknown_label_space_is_rejected():
    with pytest.raises(ValueError, match="unknown label space"):
        recognize_messages(WINDOW, "klingon")


def test_role_switch_is_a_user_turn_naming_the_next_speaker_and_both_tags():
    msg = role_switch_message("Ross", "meld")
    assert msg["role"] == "user"
    assert "reply as Ross" in msg["content"] and "<emotion></emotion>" in msg["content"]
    assert "<reply></reply>" in msg["content"]


def test_standalone_respond_prompt_is_dialogue_then_role_switch():
    system, user = respond_messages(WINDOW, "Ross", "meld")
    assert system["role"] == "system"
    switch = role_switch_message("Ross", "meld")["content"]
    assert user["content"] == f"Dialogue:\n{format_dialogue(WINDOW)}\n\n{switch}"


def test_judge_is_the_recognize_prompt_on_the_dialogue_extended_by_the_reply():
    assert judge_messages(WINDOW, "Ross", "I know!", "meld") == recognize_messages(
        [*WINDOW, {"speaker": "Ross", "text": "I know!"}], "meld")


def test_judge_prompt_does_not_contain_the_responders_stated_emotion():
    answer = "<emotion>anger</emotion> <reply>Get out of my apartment!</reply>"
    reply, status = parse_reply(answer)
    judge = _text(judge_messages(WINDOW, "Ross", reply, "meld"))
    assert status == "ok" and "Ross: Get out of my apartment!" in judge
    assert "<emotion>anger</emotion>" not in judge and "<emotion>anger" not in judge.lower()


def test_an_emotion_tag_smuggled_into_the_reply_is_removed_before_the_judge_sees_it():
    reply, status = parse_reply("<emotion>joy</emotion><reply>Yay <emotion>joy</emotion> we won</reply>")
    assert (reply, status) == ("Yay  we won", "ok")
    assert "<emotion>joy" not in _text(judge_messages(WINDOW, "Ross", reply, "meld"))


@settings(max_examples=60, deadline=None)
@given(stated=st.sets(st.sampled_from(LABEL_SPACES["meld"]), min_size=1, max_size=3),
       other=st.sets(st.sampled_from(LABEL_SPACES["meld"]), min_size=1, max_size=3),
       text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_judge_prompt_is_the_same_whatever_emotion_the_responder_stated(stated, other, text):
    body = text.replace("<", "").replace(">", "")
    reply_a, _ = parse_reply(f"{format_emotions(stated)}<reply>{body}</reply>")
    reply_b, _ = parse_reply(f"{format_emotions(other)}<reply>{body}</reply>")
    # reason: the blind judge sees the reply text only, so the stated emotion cannot change its prompt
    assert judge_messages(WINDOW, "Ross", reply_a, "meld") == judge_messages(WINDOW, "Ross", reply_b, "meld")


@pytest.mark.parametrize("text, expected", [
    ("<reply>Hi</reply>", ("Hi", "ok")),                                  # reason: plain block
    ("<reply>a</reply> then <REPLY> b </Reply>", ("b", "ok")),            # reason: last block, tags case-insensitive
    ("<emotion>joy</emotion> Hi there", ("", "no_tag")),                  # reason: no reply tag
    ("<reply>unclosed", ("", "no_tag")),                                  # reason: unbalanced tag
    ("<reply>   </reply>", ("", "empty")),                                # reason: blank reply
    ("<reply><emotion>joy</emotion></reply>", ("", "empty")),             # reason: only a (removed) emotion tag
    (None, ("", "no_tag")),                                               # reason: not a string
    (b"<reply>bytes</reply>", ("", "no_tag")),                            # reason: bytes are not text here
])
def test_parse_reply_worked_examples(text, expected):
    assert parse_reply(text) == expected


def test_parse_reply_cuts_long_replies_and_survives_megabytes():
    reply, status = parse_reply("<reply>" + "x" * (10 * MAX_REPLY_CHARS) + "</reply>")
    assert status == "ok" and len(reply) == MAX_REPLY_CHARS
    assert parse_reply("<reply>" * 200_000 + "a</reply>") == ("a", "ok")
