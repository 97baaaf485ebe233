"""The three role prompts of a self-play episode (docs/method.md §6.2) and the reply parser (§2.5).

Core module: no verl. A `window` is a list of {"speaker": str, "text": str}, oldest first; its last turn is
the utterance whose emotion is asked for. The agent loop cuts one window (`selfemo.agent.window` turns) and
hands the same turns to all three roles. Assumption: the paper's prompts are not available; these are ours.

- recognize: system + dialogue window + "what emotion(s) does <speaker> express in the last turn?"
- respond:   a role switch ("now reply as <next speaker>; state your emotion, then the reply")
- judge:     the recognize prompt on the window extended by the responder's reply text only, so the
             stated emotion is never shown to the judge (the blind reading).
"""

from __future__ import annotations

import re

from selfemo_verl.labels import check_label_space

SYSTEM = (
    "You are an expert in emotion recognition in conversation. You read dialogues carefully and "
    "answer exactly in the requested format."
)
_REPLY_OPEN, _REPLY_CLOSE = "<reply>", "</reply>"
MAX_REPLY_CHARS = 1000  # a longer reply is cut before it is shown to the judge
# An emotion tag inside the reply would leak the stated emotion to the blind judge: drop it.
_EMOTION_BLOCK = re.compile(r"<emotion>.*?</emotion>|</?emotion>", re.IGNORECASE | re.DOTALL)


def format_dialogue(window: list[dict]) -> str:
    """One line per turn, `Speaker: text`.

    >>> format_dialogue([{"speaker": "Ross", "text": "Hi."}, {"speaker": "Rachel", "text": "Oh, hi!"}])
    'Ross: Hi.\\nRachel: Oh, hi!'
    """
    return "\n".join(f"{turn['speaker']}: {turn['text']}" for turn in window)


def _choices(label_space: str) -> str:
    return ", ".join(check_label_space(label_space))


def recognize_messages(window: list[dict], label_space: str) -> list[dict]:
    """Chat messages asking for the emotion(s) of the last turn of `window`."""
    speaker = window[-1]["speaker"]
    user = (
        f"Dialogue:\n{format_dialogue(window)}\n\n"
        f"What emotion(s) does {speaker} express in the last turn? "
        f"Choose one or more (at most 3) of: {_choices(label_space)}. "
        "Answer with the labels inside <emotion></emotion> tags, for example <emotion>neutral</emotion>."
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def role_switch_message(next_speaker: str, label_space: str) -> dict:
    """The user message (trained with mask 0) that turns the recognizer into the responder."""
    content = (
        f"Now reply as {next_speaker} and continue the dialogue with one turn. "
        f"First state the emotion you express, one or more of: {_choices(label_space)}, inside "
        "<emotion></emotion> tags; then write the reply inside <reply></reply> tags."
    )
    return {"role": "user", "content": content}


def respond_messages(window: list[dict], next_speaker: str, label_space: str) -> list[dict]:
    """Stand-alone respond prompt (evaluation): the dialogue, then the role switch."""
    switch = role_switch_message(next_speaker, label_space)
    user = f"Dialogue:\n{format_dialogue(window)}\n\n{switch['content']}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def judge_messages(window: list[dict], reply_speaker: str, reply_text: str, label_space: str) -> list[dict]:
    """The blind judge: recognize on the window plus the reply text only (never the stated emotion)."""
    return recognize_messages([*window, {"speaker": reply_speaker, "text": reply_text}], label_space)


def parse_reply(text) -> tuple[str, str]:
    """Extract the reply of a respond answer; never raises. Status: ok, no_tag, empty.

    Takes the last complete <reply>...</reply> block, removes any <emotion> tag from it (the judge must
    stay blind), strips it and cuts it to MAX_REPLY_CHARS.

    >>> parse_reply("<emotion>joy</emotion> <reply> Great news! </reply>")
    ('Great news!', 'ok')
    >>> parse_reply("<emotion>joy</emotion> Great news!")
    ('', 'no_tag')
    """
    text = text if isinstance(text, str) else ""
    lower = text.lower()
    end = lower.rfind(_REPLY_CLOSE)
    start = lower.rfind(_REPLY_OPEN, 0, end) if end != -1 else -1
    if start == -1:
        return "", "no_tag"
    body = text[start + len(_REPLY_OPEN) : end][: 4 * MAX_REPLY_CHARS]
    reply = _EMOTION_BLOCK.sub("", body).strip()[:MAX_REPLY_CHARS]
    return (reply, "ok") if reply else ("", "empty")
