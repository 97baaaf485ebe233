"""verl reward function for SELF-EMO: `compute_score(data_source, solution_str, ground_truth, extra_info, **kw)`.

Adapter: translates verl's per-trajectory call (verl 0.9.1 reward loop, `NaiveRewardManager.run_single`) into
core calls (`labels.parse_emotions`, `rewards.score_episode`); no math of its own. Selected with
`reward.custom_reward_function.path=pkg://selfemo_verl.reward_fn` (or `reward_fns/selfemo_reward.py`); the knobs
come from `reward.custom_reward_function.reward_kwargs` (`selfemo.reward.*` in the YAML): eps, beta, sigma,
r_invalid, w_rec, w_con, w_und (`rewards.RewardKnobs`). A knob left out uses its default, `rewards.REWARD_DEFAULTS`
(docs/method.md §3).

Where the labels come from
--------------------------
verl's naive reward manager merges the agent loop's `AgentLoopOutput.extra_fields` into `extra_info`, so the
self-play loop hands over its parsed role outputs as `extra_info["selfemo"]` (nothing is re-parsed from the
concatenated response text). The contract for that dict (every key optional; missing = that step did not run):

    extra_fields["selfemo"] = {
        "label_space":     "meld",            # dataset name (labels.LABEL_SPACES)
        "pred":            ["joy"],           # P_t: recognizer's labels for the real target (canonical words)
        "pred_status":     "ok",              # labels.STATUSES, or "missing" (no answer: server error, ...)
        "stated":          ["joy"],           # E_{t+1}: emotion the responder states (first self-play turn)
        "stated_status":   "ok",
        "reply":           "Oh wow, ...",     # u'_{t+1}: the responder's reply text (flywheel; not scored here)
        "reply_status":    "ok",              # reply parse status; not "ok" -> nothing judged -> judged_status
                                              #   "missing" -> r_con scores r_invalid for that turn
        "reply_speaker":   "Ross",            # who the responder spoke as (flywheel; not scored here)
        "judged":          ["joy"],           # P-hat_{t+1}: blind judge's (majority) labels for the reply
        "judged_status":   "ok",              # or "judge_error": the judge server never answered -> r_con
                                              #   leaves that turn out (not the policy's fault)
        "judge_agreement": 1.0,               # share of judge samples equal to the majority set (flywheel)
        "later_turns":     [ {the same stated ... judge_agreement keys}, ... ],
                                              # turns 2..T when self_play_turns > 1 (default [])
        "error":           None,              # str reason when the episode ended early
        "infra_error":     0,                 # 1: a server call raised, timed out, aborted or returned an
                                              #   invalid object (docs/method.md §3.5): the trainer gives A = 0
        "mode":            "self_play",       # or "recognize" (no self-play turns); informational
    }

Scoring: r_rec from pred/pred_status; r_con = mean over turns (first + later_turns) of sIoU(judged, stated), a
turn with a non-"ok" status scoring r_invalid; a turn whose "stated_status" key is absent did not run and is
skipped; r_und = sIoU(stated, extra_info["next_gold"]) for the first turn when next_gold is non-empty.
Without `extra_info["selfemo"]` (plain single-turn rollout, e.g. validation) `solution_str` is parsed as one
recognition answer. A "selfemo" value that is not a dict scores as a missing recognition (r_invalid).
Label space: extra_info["label_space"], else selfemo["label_space"], else data_source "selfemo/<dataset>";
if none names a known space the sample scores r_invalid with parse_ok 0.

Returned keys (identical for every sample, all finite scalars, for verl's reward_extra_info and logging):
score (R), r_rec, r_con, r_und (floats; 0.0 when absent), has_con, has_und (1.0/0.0: average r_con/r_und
over rows where these are 1), parse_ok (1.0 iff the recognition parsed), pred_mask (int bitmask of P_t over
LABEL_SPACES[space], read by the SELF-GRPO trainer), n_pred (int |P_t|), gold_mask (int bitmask of the gold
labels, for the corpus-level validation metrics the trainer computes), infra_error (1.0 iff the record says an
infrastructure failure hit the episode; the trainer leaves such episodes out of training, docs/method.md §3.5).
With default knobs score is in [0, w_rec + w_con + w_und] = [0, 1.75]. Never raises for any
data_source/solution_str/ground_truth/extra_info; an unknown knob name raises ValueError (a config error).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from selfemo_verl.labels import LABEL_SPACES, dataset_of, parse_emotions
from selfemo_verl.rewards import RewardKnobs, as_label_set, is_ok, labels_to_mask, score_episode

_KNOBS = frozenset(field.name for field in fields(RewardKnobs))
_VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})  # passed by verl, unused here


def _label_space(data_source, extra_info: Mapping, selfemo: Mapping) -> str | None:
    """First known label space among extra_info, the selfemo dict and data_source "selfemo/<dataset>"."""
    for cand in (extra_info.get("label_space"), selfemo.get("label_space"), dataset_of(data_source)):
        if isinstance(cand, str):
            if cand in LABEL_SPACES:
                return cand
            if cand.lower() in LABEL_SPACES:
                return cand.lower()
    return None


def _gold(ground_truth, label_space: str) -> frozenset:
    """Gold labels from a list / numpy array, or from a string answer ("joy", "joy, surprise")."""
    if isinstance(ground_truth, str):
        return parse_emotions(ground_truth, label_space)[0]
    return as_label_set(ground_truth)


def _turns(selfemo: Mapping) -> list[tuple]:
    """(stated, stated_status, judged, judged_status) per self-play turn that ran (stated_status present)."""
    turns = [selfemo]
    later = selfemo.get("later_turns")
    if isinstance(later, (list, tuple)) and later:
        turns += [t for t in later if _is_map(t)]
    return [(t.get("stated"), t["stated_status"], t.get("judged"), t.get("judged_status"))
            for t in turns if "stated_status" in t]


def _is_map(value) -> bool:
    return type(value) is dict or isinstance(value, Mapping)


def _infra_error(selfemo: Mapping) -> float:
    """1.0 iff the record's `infra_error` is exactly 1 / True (any other value: the model's own record)."""
    flag = selfemo.get("infra_error")
    return 1.0 if isinstance(flag, (bool, int, float)) and flag == 1 else 0.0


def _result(space, pred, status, gold, scores: dict, infra: float = 0.0) -> dict:
    """Add the recognition bookkeeping keys to score_episode's dict (one fixed key set for every sample)."""
    ok = is_ok(status)
    scores["infra_error"] = infra
    scores["parse_ok"] = 1.0 if ok else 0.0
    scores["pred_mask"] = labels_to_mask(pred, space) if ok and space else 0
    scores["n_pred"] = len(pred) if ok else 0
    scores["gold_mask"] = labels_to_mask(gold, space) if space else 0
    return scores


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """Score one trajectory: R = w_rec r_rec + w_con r_con + w_und r_und (docs/method.md §3.4), with its components.

    >>> r = compute_score("selfemo/meld", "<emotion>joy, surprise</emotion>", ["joy"])
    >>> round(r["score"], 3), r["parse_ok"], r["pred_mask"], r["has_con"]
    (0.524, 1.0, 18, 0.0)
    >>> sp = {"pred": ["joy"], "pred_status": "ok", "stated": ["anger"], "stated_status": "ok",
    ...       "judged": ["anger"], "judged_status": "ok"}
    >>> r = compute_score("selfemo/meld", "ignored", ["joy"], {"selfemo": sp, "next_gold": ["anger"]})
    >>> r["score"], r["r_con"], r["r_und"], r["infra_error"]
    (1.75, 1.0, 1.0, 0.0)
    """
    if kwargs and not kwargs.keys() <= _KNOBS:
        kwargs = {k: v for k, v in kwargs.items() if k not in _VERL_KWARGS}
        if not kwargs.keys() <= _KNOBS:
            raise ValueError(f"unknown selfemo reward knob(s) {sorted(kwargs.keys() - _KNOBS)}; "
                             f"expected some of {sorted(_KNOBS)}")
    info = extra_info if _is_map(extra_info) else {}
    raw = info.get("selfemo")
    selfemo = raw if _is_map(raw) else {}
    space = _label_space(data_source, info, selfemo)
    if space is None:
        return _result(None, frozenset(), "missing", frozenset(),
                       score_episode(frozenset(), "missing", frozenset(), **kwargs), _infra_error(selfemo))
    if raw is None:
        pred, status = parse_emotions(solution_str, space)
    else:
        pred, status = as_label_set(selfemo.get("pred")), selfemo.get("pred_status", "missing")
    gold = _gold(ground_truth, space)
    scores = score_episode(
        pred, status, gold, label_space=space, turns=_turns(selfemo), next_gold=info.get("next_gold"), **kwargs,
    )
    return _result(space, pred, status, gold, scores, _infra_error(selfemo))
