"""Label spaces, synonyms, valence-arousal coordinates, the answer parser and the data source (docs/method.md §2).

Core module: no verl, no ray. Model output is untrusted, so `parse_emotions` never raises.
"""

from __future__ import annotations

import re

# Canonical words per dataset, in the COSMIC pickle / per_erc JSON id order (docs/method.md §2.1).
LABEL_SPACES: dict[str, tuple[str, ...]] = {
    "iemocap": ("happy", "sad", "neutral", "angry", "excited", "frustrated"),
    "meld": ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"),
    "emorynlp": ("Joyful", "Mad", "Peaceful", "Neutral", "Sad", "Powerful", "Scared"),
}

# Well-known synonyms -> canonical word, one table per dataset (keys are lower case).
SYNONYMS: dict[str, dict[str, str]] = {
    "meld": {
        "joyful": "joy", "happy": "joy", "happiness": "joy", "excited": "joy", "excitement": "joy",
        "surprised": "surprise", "shock": "surprise", "shocked": "surprise", "astonished": "surprise",
        "fearful": "fear", "afraid": "fear", "scared": "fear", "anxious": "fear", "anxiety": "fear",
        "sad": "sadness", "sorrow": "sadness", "unhappy": "sadness", "upset": "sadness",
        "disgusted": "disgust", "contempt": "disgust",
        "angry": "anger", "mad": "anger", "annoyed": "anger", "frustrated": "anger", "rage": "anger",
        "neutrality": "neutral", "calm": "neutral", "none": "neutral",
    },
    "emorynlp": {
        "joy": "Joyful", "happy": "Joyful", "happiness": "Joyful", "excited": "Joyful", "joyous": "Joyful",
        "anger": "Mad", "angry": "Mad", "annoyed": "Mad", "frustrated": "Mad", "furious": "Mad",
        "calm": "Peaceful", "peace": "Peaceful", "content": "Peaceful", "relaxed": "Peaceful",
        "sadness": "Sad", "unhappy": "Sad", "upset": "Sad", "sorrow": "Sad",
        "power": "Powerful", "confident": "Powerful", "proud": "Powerful", "strong": "Powerful",
        "fear": "Scared", "afraid": "Scared", "fearful": "Scared", "anxious": "Scared", "scary": "Scared",
        "neutrality": "Neutral", "none": "Neutral",
    },
    "iemocap": {
        "happiness": "happy", "joy": "happy", "joyful": "happy", "hap": "happy",
        "sadness": "sad", "unhappy": "sad", "upset": "sad",
        "neu": "neutral", "neutrality": "neutral", "calm": "neutral", "none": "neutral",
        "anger": "angry", "mad": "angry", "ang": "angry", "furious": "angry",
        "excitement": "excited", "exc": "excited", "enthusiastic": "excited",
        "frustration": "frustrated", "fru": "frustrated", "annoyed": "frustrated", "irritated": "frustrated",
    },
}

# Valence-arousal coordinates in [-1, 1]^2 (valence, arousal) for every canonical label.
# Source: Assumption. Hand-placed on Russell's circumplex of affect (J. A. Russell, "A circumplex model of
# affect", JPSP 39(6), 1980) following the angular placements in Scherer (2005, "What are emotions?",
# Soc. Sci. Inf. 44(4), Fig. 2); they are not measured values from a lexicon.
_VA_BY_WORD: dict[str, tuple[float, float]] = {
    "neutral": (0.0, 0.0),
    "joy": (0.8, 0.5), "happy": (0.8, 0.4), "excited": (0.7, 0.8),
    "surprise": (0.2, 0.8),
    "fear": (-0.6, 0.7),
    "sadness": (-0.7, -0.4), "sad": (-0.7, -0.4),
    "disgust": (-0.7, 0.3),
    "anger": (-0.6, 0.8), "angry": (-0.6, 0.8), "mad": (-0.6, 0.8),
    "frustrated": (-0.5, 0.4),
    "peaceful": (0.5, -0.5), "powerful": (0.6, 0.4), "scared": (-0.6, 0.7), "joyful": (0.8, 0.5),
}
VALENCE_AROUSAL: dict[str, dict[str, tuple[float, float]]] = {
    space: {label: _VA_BY_WORD[label.lower()] for label in labels} for space, labels in LABEL_SPACES.items()
}

STATUSES = ("ok", "no_tag", "unknown_label", "empty", "too_many")
DATA_SOURCE_PREFIX = "selfemo/"  # a SELF-EMO row's data_source is "selfemo/<dataset>" (`data_source`, `dataset_of`)

# lower-case word -> canonical label, canonical words and synonyms together (built once).
_LOOKUP: dict[str, dict[str, str]] = {
    space: {**SYNONYMS[space], **{label.lower(): label for label in labels}} for space, labels in LABEL_SPACES.items()
}

_OPEN, _CLOSE = "<emotion>", "</emotion>"
_SPLIT = re.compile(r"\s*(?:[,;/|]|\band\b)\s*", re.IGNORECASE)
_STRIP = " \t\r\n.!?\"'`*_()[]{}:-"
_MAX_BARE_CHARS = 200  # a bare (untagged) answer longer than this is prose, not a label list


def check_label_space(label_space: str) -> tuple[str, ...]:
    """Return the canonical labels of `label_space`; raise ValueError naming the valid ones."""
    if label_space not in LABEL_SPACES:
        raise ValueError(f"unknown label space {label_space!r}; expected one of {sorted(LABEL_SPACES)}")
    return LABEL_SPACES[label_space]


def data_source(dataset: str) -> str:
    """The `data_source` of a parquet row of `dataset`: "selfemo/<dataset>" (verl groups its metrics by it).

    >>> data_source("meld")
    'selfemo/meld'
    """
    return DATA_SOURCE_PREFIX + dataset


def dataset_of(source) -> str | None:
    """The dataset (label space) of a "selfemo/<dataset>" data source; None for any other source or value.

    >>> dataset_of("selfemo/meld"), dataset_of("openai/gsm8k"), dataset_of("selfemo/toy"), dataset_of(None)
    ('meld', None, None, None)
    """
    if not isinstance(source, str) or not source.startswith(DATA_SOURCE_PREFIX):
        return None
    dataset = source[len(DATA_SOURCE_PREFIX) :]
    return dataset if dataset in LABEL_SPACES else None


def canonical_label(word: str, label_space: str) -> str | None:
    """Map one answer word to the dataset's canonical label, or None.

    >>> canonical_label("Angry!", "meld"), canonical_label("joy", "emorynlp"), canonical_label("xyz", "meld")
    ('anger', 'Joyful', None)
    """
    key = word.strip(_STRIP).lower()
    lookup = _LOOKUP[label_space]
    return lookup.get(key) or lookup.get(" ".join(key.split()))


def format_emotions(labels) -> str:
    """The answer format the prompts ask for: `<emotion>a, b</emotion>` (labels sorted for determinism)."""
    return f"{_OPEN}{', '.join(sorted(labels))}{_CLOSE}"


def _as_text(text) -> str:
    if isinstance(text, str):
        return text
    if isinstance(text, (bytes, bytearray)):
        return bytes(text).decode("utf-8", errors="replace")
    return "" if text is None else str(text)


def _last_block(text: str) -> str | None:
    """Content of the last complete <emotion>...</emotion> block (case-insensitive tags), or None."""
    lower = text.lower()
    end = lower.rfind(_CLOSE)
    while end != -1:
        start = lower.rfind(_OPEN, 0, end)
        if start != -1:
            return text[start + len(_OPEN) : end]
        end = lower.rfind(_CLOSE, 0, end)
    return None


def _parse_list(body: str, label_space: str, max_labels: int) -> tuple[frozenset, str]:
    parts = [p for p in (s.strip(_STRIP) for s in _SPLIT.split(body)) if p]
    if not parts:
        return frozenset(), "empty"
    labels = [canonical_label(p, label_space) for p in parts]
    if any(label is None for label in labels):
        return frozenset(), "unknown_label"
    if len(set(labels)) > max_labels:
        return frozenset(), "too_many"
    return frozenset(labels), "ok"


def parse_emotions(text, label_space: str, max_labels: int = 3) -> tuple[frozenset, str]:
    """Parse a model answer into canonical labels and a status; never raises on the text.

    Takes the last `<emotion>...</emotion>` block; without one, accepts a bare answer only if the whole
    answer is a label list. Splits on `, ; / |` and the word "and", maps synonyms, keeps at most
    `max_labels` distinct labels. Any status other than "ok" comes with an empty set.
    Statuses: ok, no_tag, unknown_label, empty, too_many.

    >>> labels, status = parse_emotions("I think... <emotion>Joyful and surprised</emotion>", "meld")
    >>> sorted(labels), status
    (['joy', 'surprise'], 'ok')
    >>> parse_emotions("anger", "meld"), parse_emotions("She is angry.", "meld")
    ((frozenset({'anger'}), 'ok'), (frozenset(), 'no_tag'))
    """
    check_label_space(label_space)
    text = _as_text(text)
    body = _last_block(text)
    if body is not None:
        return _parse_list(body, label_space, max_labels)
    stripped = text.strip()
    if not stripped:
        return frozenset(), "empty"
    if len(stripped) > _MAX_BARE_CHARS or "<" in stripped:
        return frozenset(), "no_tag"
    labels, status = _parse_list(stripped, label_space, max_labels)
    return (labels, status) if status == "ok" else (frozenset(), "no_tag")
