"""Pure logic of one self-play episode (docs/method.md §6): who replies, the judge's majority vote, the record.

Core module: no verl, no ray. The agent loop (`selfemo_verl.agent_loop`) only moves tokens; every decision about
labels, speakers and the `extra_fields["selfemo"]` record that the reward (`selfemo_verl.reward_fn`) and the
flywheel read is made here. Model output is untrusted: nothing here raises on it.

Episode record (the contract documented in `selfemo_verl/reward_fn.py`; a key is absent when its step did not run):
label_space, pred, pred_status, [stated, stated_status, reply, reply_status, reply_speaker, judged,
judged_status, judge_agreement], later_turns (turns 2..T, same keys), error (str reason or None),
infra_error (int 0/1), plus mode ("self_play" | "recognize").

Two kinds of failure, never confused (docs/method.md §3.5): `infra_error = 1` when a server call of the episode raised,
timed out, aborted or returned an invalid object at any step, one judge sample included (the agent loop calls
`SelfPlayRecord.infra_fail`; a judge sample that never came back also sets it through its turn); the policy's own
failures (empty, unparseable or cut answers) only set `error` and the parse statuses, with `infra_error = 0`.

Assumption: the paper gives no rule for multi-turn self-play; we alternate speakers (the responder of turn k+1 is
the most recent speaker other than the one who just spoke) and judge every synthetic turn blind.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from selfemo_verl.labels import parse_emotions
from selfemo_verl.prompts import parse_reply
from selfemo_verl.rewards import JUDGE_ERROR  # every judge sample failed at the server: r_con skips the turn

FALLBACK_SPEAKER = "Listener"  # the responder's name when the row names no next speaker and no other speaker spoke
MISSING = "missing"  # status of a step whose answer never came (server error, empty generation, no reply to judge)


def recent_turns(window: list[dict], n: int) -> list[dict]:
    """The last `n` turns of `window` (all of them when n <= 0 or n >= len).

    >>> [t["text"] for t in recent_turns([{"speaker": "A", "text": str(i)} for i in range(4)], 2)]
    ['2', '3']
    """
    return list(window[-n:]) if n > 0 else list(window)


def responder_name(window: list[dict], next_speaker=None) -> str:
    """Who speaks next: `next_speaker` when given, else the latest speaker other than the last one, else a fallback.

    >>> w = [{"speaker": "Ross", "text": "Hi."}, {"speaker": "Rachel", "text": "Oh, hi!"}]
    >>> responder_name(w, "Monica"), responder_name(w, None), responder_name(w[:1], "")
    ('Monica', 'Ross', 'Listener')
    """
    if isinstance(next_speaker, str) and next_speaker.strip():
        return next_speaker.strip()
    last = window[-1]["speaker"] if window else None
    for turn in reversed(window):
        if turn.get("speaker") and turn["speaker"] != last:
            return turn["speaker"]
    return FALLBACK_SPEAKER


def majority_vote(answers: list[tuple[frozenset, str]]) -> tuple[frozenset, str, float]:
    """The judge's reading from k samples: the most frequent parsed set, its status and the agreement share.

    Only samples that parsed ("ok") vote; ties go to the set seen first. agreement = (# samples equal to the
    majority set) / k. With no parsed sample the result is (empty set, first sample's status, 0.0).
    Assumption: the paper gives no rule for k > 1; we use plain plurality over exact label sets (docs/method.md §6.6).

    >>> j, s = frozenset({"joy"}), frozenset({"sadness"})
    >>> majority_vote([(j, "ok"), (s, "ok"), (j, "ok"), (frozenset(), "no_tag")])
    (frozenset({'joy'}), 'ok', 0.5)
    >>> majority_vote([(frozenset(), "no_tag")])
    (frozenset(), 'no_tag', 0.0)
    """
    if not answers:
        return frozenset(), MISSING, 0.0
    votes = Counter(labels for labels, status in answers if status == "ok")
    if not votes:
        return frozenset(), answers[0][1], 0.0
    best = max(votes.values())
    winner = next(labels for labels, status in answers if status == "ok" and votes[labels] == best)
    return winner, "ok", best / len(answers)


def _labels(labels) -> list[str]:
    return sorted(labels)


def recognition_fields(text, label_space: str) -> dict:
    """`pred`/`pred_status` of the recognize answer; `text=None` means no answer came (status "missing").

    >>> recognition_fields("<emotion>Joy</emotion>", "meld"), recognition_fields(None, "meld")["pred_status"]
    ({'pred': ['joy'], 'pred_status': 'ok'}, 'missing')
    """
    if text is None:
        return {"pred": [], "pred_status": MISSING}
    labels, status = parse_emotions(text, label_space)
    return {"pred": _labels(labels), "pred_status": status}


@dataclass
class SelfPlayTurn:
    """One respond + judge turn: what the responder said and what the blind judge read from it."""

    speaker: str
    stated: frozenset = frozenset()
    stated_status: str = MISSING
    reply: str = ""
    reply_status: str = MISSING
    judged: frozenset = frozenset()
    judged_status: str = MISSING
    judge_agreement: float = 0.0
    judge_failures: int = 0  # judge samples the server never returned (infrastructure, not the policy)

    def read_answer(self, text, label_space: str) -> None:
        """Parse the responder's answer (`None`: no answer) into the stated emotion and the reply."""
        if text is None:
            return
        self.stated, self.stated_status = parse_emotions(text, label_space)
        self.reply, self.reply_status = parse_reply(text)

    def read_judge(self, texts: list, label_space: str) -> None:
        """Majority-vote the judge samples' answers (`None` entries: samples the server never returned).

        When no sample came back at all the turn is JUDGE_ERROR: an infrastructure failure, not the policy's.
        Every missing sample is counted in `judge_failures`, which marks the episode `infra_error`.
        """
        self.judge_failures = sum(1 for t in texts if t is None)
        if texts and all(t is None for t in texts):
            self.judged, self.judged_status, self.judge_agreement = frozenset(), JUDGE_ERROR, 0.0
            return
        answers = [parse_emotions(t, label_space) if t is not None else (frozenset(), MISSING) for t in texts]
        self.judged, self.judged_status, self.judge_agreement = majority_vote(answers)

    def as_fields(self) -> dict:
        return {
            "stated": _labels(self.stated), "stated_status": self.stated_status,
            "reply": self.reply, "reply_status": self.reply_status, "reply_speaker": self.speaker,
            "judged": _labels(self.judged), "judged_status": self.judged_status,
            "judge_agreement": float(self.judge_agreement),
        }


@dataclass
class SelfPlayRecord:
    """Everything an episode parsed; `as_fields()` is `extra_fields["selfemo"]`."""

    label_space: str
    mode: str  # "self_play" | "recognize"
    recognize_text: str | None = None
    turns: list[SelfPlayTurn] = field(default_factory=list)
    error: str | None = None
    infra: bool = False  # a server call failed (raised, timed out, aborted, invalid object): not the policy's fault

    def fail(self, reason: str) -> None:
        """Record why the episode ended early, the policy's fault (the first reason wins)."""
        if self.error is None:
            self.error = reason

    def infra_fail(self, reason: str) -> None:
        """Record an infrastructure failure; its reason replaces a policy reason, the first infra reason wins.

        >>> rec = SelfPlayRecord("meld", "self_play"); rec.fail("respond: empty generation")
        >>> rec.infra_fail("judge: 1/2 samples failed: server error"); rec.infra_fail("later")
        >>> rec.error, rec.as_fields()["infra_error"]
        ('judge: 1/2 samples failed: server error', 1)
        """
        if not self.infra:
            self.infra, self.error = True, reason

    def infra_error(self) -> int:
        """1 iff any server call of the episode failed, a single judge sample included; else 0."""
        return int(self.infra or any(turn.judge_failures for turn in self.turns))

    def as_fields(self) -> dict:
        """The reward's dict: recognition, the first turn at top level, turns 2..T under `later_turns`.

        >>> rec = SelfPlayRecord("meld", "self_play", "<emotion>joy</emotion>")
        >>> turn = SelfPlayTurn("Ross"); turn.read_answer("<emotion>anger</emotion><reply>No!</reply>", "meld")
        >>> turn.read_judge(["<emotion>anger</emotion>"], "meld"); rec.turns.append(turn)
        >>> f = rec.as_fields(); f["pred"], f["stated"], f["reply"], f["judged"], f["judge_agreement"], f["later_turns"]
        (['joy'], ['anger'], 'No!', ['anger'], 1.0, [])
        """
        fields = {"mode": self.mode, "label_space": self.label_space,
                  **recognition_fields(self.recognize_text, self.label_space)}
        if self.turns:
            fields.update(self.turns[0].as_fields())
        fields["later_turns"] = [turn.as_fields() for turn in self.turns[1:]]
        fields["error"] = self.error
        fields["infra_error"] = self.infra_error()
        return fields


def extend_window(window: list[dict], turn: SelfPlayTurn) -> list[dict]:
    """The dialogue with the synthetic reply appended (the context of the next self-play turn).

    >>> t = SelfPlayTurn("Ross", reply="Sure.", reply_status="ok")
    >>> extend_window([{"speaker": "Rachel", "text": "Coffee?"}], t)[-1]
    {'speaker': 'Ross', 'text': 'Sure.'}
    """
    return [*window, {"speaker": turn.speaker, "text": turn.reply}]
