"""parse_emotions and the label tables (docs/method.md §2)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfemo_verl.labels import (
    LABEL_SPACES,
    STATUSES,
    SYNONYMS,
    VALENCE_AROUSAL,
    canonical_label,
    format_emotions,
    parse_emotions,
)


def test_label_spaces_are_the_canonical_words_in_cosmic_id_order():
    assert LABEL_SPACES["meld"] == ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
    assert LABEL_SPACES["emorynlp"] == ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared")
    assert LABEL_SPACES["iemocap"] == ("happy", "sad", "neutral", "angry", "excited", "frustrated")


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
def test_every_synonym_maps_to_a_canonical_label_and_parses(space):
    for word, label in SYNONYMS[space].items():
        assert label in LABEL_SPACES[space], (space, word)
        assert word.lower() not in {l.lower() for l in LABEL_SPACES[space]}, f"{word} shadows a canonical label"
        assert parse_emotions(f"<emotion>{word}</emotion>", space) == (frozenset({label}), "ok")
        assert parse_emotions(f"<emotion>{word.upper()}.</emotion>", space) == (frozenset({label}), "ok")


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
def test_every_canonical_label_parses_to_itself(space):
    for label in LABEL_SPACES[space]:
        assert canonical_label(label.lower(), space) == label
        assert parse_emotions(format_emotions([label]), space) == (frozenset({label}), "ok")


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
def test_valence_arousal_table_covers_every_label_within_unit_square(space):
    assert set(VALENCE_AROUSAL[space]) == set(LABEL_SPACES[space])
    for v, a in VALENCE_AROUSAL[space].values():
        assert -1.0 <= v <= 1.0 and -1.0 <= a <= 1.0


CASES = [
    # (text, space, labels, status)  # reason
    ("<emotion>joy</emotion>", "meld", {"joy"}, "ok"),  # plain tagged answer
    ("<emotion>joy, surprise</emotion>", "meld", {"joy", "surprise"}, "ok"),  # multi-label with comma
    ("<emotion>Joy; SURPRISE / anger</emotion>", "meld", {"joy", "surprise", "anger"}, "ok"),  # ; / and case
    ("<emotion>joy | sad and angry</emotion>", "meld", {"joy", "sadness", "anger"}, "ok"),  # | and the word "and"
    ("<emotion>joy, joyful, happy</emotion>", "meld", {"joy"}, "ok"),  # synonyms collapse to one label
    ("Let me think. <emotion>fear</emotion> no wait <emotion>anger</emotion>", "meld", {"anger"}, "ok"),  # last block
    ("<EMOTION> 'Sad' </Emotion>", "emorynlp", {"Sad"}, "ok"),  # tag case, quotes stripped
    ("<emotion>anger</emotion>", "emorynlp", {"Mad"}, "ok"),  # cross-dataset synonym
    ("<emotion>happiness</emotion>", "iemocap", {"happy"}, "ok"),  # IEMOCAP synonym
    ("neutral", "meld", {"neutral"}, "ok"),  # bare answer that is a label list
    ("Joy, surprise.", "meld", {"joy", "surprise"}, "ok"),  # bare label list with punctuation
    ("The speaker is angry.", "meld", set(), "no_tag"),  # prose without a tag
    ("<emotion>joy", "meld", set(), "no_tag"),  # unbalanced tag
    ("joy</emotion>", "meld", set(), "no_tag"),  # unbalanced tag, other side
    ("<emotion>  </emotion>", "meld", set(), "empty"),  # empty block
    ("<emotion>, ;</emotion>", "meld", set(), "empty"),  # only separators
    ("", "meld", set(), "empty"),  # empty answer
    ("<emotion>joy, bored</emotion>", "meld", set(), "unknown_label"),  # one unknown word spoils the answer
    ("<emotion>Peaceful</emotion>", "meld", set(), "unknown_label"),  # a label of another dataset
    ("<emotion>joy, fear, anger, disgust</emotion>", "meld", set(), "too_many"),  # 4 > max_labels=3
]


@pytest.mark.parametrize("text,space,labels,status", CASES)
def test_parse_emotions_worked_cases(text, space, labels, status):
    assert parse_emotions(text, space) == (frozenset(labels), status)


def test_max_labels_is_a_parameter():
    assert parse_emotions("<emotion>joy, fear</emotion>", "meld", max_labels=1) == (frozenset(), "too_many")
    assert parse_emotions("<emotion>joy, fear, anger, disgust</emotion>", "meld", max_labels=4)[1] == "ok"


def test_parse_emotions_survives_huge_binary_and_non_string_input():
    huge = "x" * 3_000_000 + "<emotion>joy</emotion>"
    assert parse_emotions(huge, "meld") == (frozenset({"joy"}), "ok")
    assert parse_emotions("<emotion>" * 100_000, "meld")[1] == "no_tag"
    assert parse_emotions(b"\xff\xfe<emotion>joy</emotion>", "meld") == (frozenset({"joy"}), "ok")
    assert parse_emotions(None, "meld") == (frozenset(), "empty")
    assert parse_emotions(12345, "meld")[1] in STATUSES


def test_unknown_label_space_is_a_config_error():
    with pytest.raises(ValueError, match="unknown label space 'dailydialog'"):
        parse_emotions("<emotion>joy</emotion>", "dailydialog")


@settings(max_examples=300, deadline=None)
@given(text=st.text(), space=st.sampled_from(sorted(LABEL_SPACES)), max_labels=st.integers(1, 7))
def test_parse_emotions_never_raises_and_status_is_allowed(text, space, max_labels):
    labels, status = parse_emotions(text, space, max_labels)
    assert status in STATUSES
    assert labels <= set(LABEL_SPACES[space])
    assert (status == "ok") == bool(labels)
    assert len(labels) <= max_labels


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(), space=st.sampled_from(sorted(LABEL_SPACES)), data=st.data(),
)
def test_a_tagged_answer_after_any_preamble_parses_to_its_labels(prefix, space, data):
    chosen = data.draw(st.sets(st.sampled_from(LABEL_SPACES[space]), min_size=1, max_size=3))
    assert parse_emotions(prefix.replace("<", "") + format_emotions(chosen), space) == (frozenset(chosen), "ok")
