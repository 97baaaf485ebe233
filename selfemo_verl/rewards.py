"""Reward math for SELF-EMO (docs/method.md §3-4): smoothed IoU, episode reward, group consistency, label bitmasks.

Core module: plain Python and numpy, no verl, no ray. Label sets arrive from untrusted model output, so every
function here is total on its *label* arguments (any container, unknown labels, empty sets) and raises only on
configuration errors (an unknown label space, `beta > 0` without a label space, `beta` outside [0, 1], `eps < 0`).

Assumption (whole module): the paper's full text is not available; the formulas are this project's
(docs/method.md §3-4), chosen to match the abstract's "multi-label alignment score plus a group-level consistency
term".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from selfemo_verl.labels import LABEL_SPACES, VALENCE_AROUSAL, check_label_space


@dataclass(frozen=True)
class RewardKnobs:
    """The reward knobs with their defaults (docs/method.md §3): `selfemo.reward` of selfemo_trainer.yaml.

    The one copy of these defaults in code: the keyword defaults below read `REWARD_DEFAULTS`, and
    tests/test_config_on_cpu.py keeps them equal to the YAML, from which the recipes pass them to `compute_score`.
    """

    eps: float = 0.1  # ε: additive smoothing of the IoU
    beta: float = 0.0  # β: semantic smoothing of the gold set
    sigma: float = 0.5  # σ: width of the valence-arousal kernel
    r_invalid: float = 0.0  # score of an answer whose parse status is not "ok"
    w_rec: float = 1.0  # weight of r_rec
    w_con: float = 0.5  # weight of r_con
    w_und: float = 0.25  # weight of r_und


REWARD_DEFAULTS = RewardKnobs()
_D = REWARD_DEFAULTS  # short name for the keyword defaults below

_INDEX: dict[str, dict[str, int]] = {sp: {lab: i for i, lab in enumerate(labs)} for sp, labs in LABEL_SPACES.items()}


def as_label_set(labels) -> frozenset:
    """Coerce any label container (set, list, tuple, numpy array, a single string, None) to a frozenset; never raises.

    A string is one label (not a sequence of characters). Members are kept as they are (a non-label member can
    only count as a wrong label); if some member is unhashable every member becomes `str(member)`. Something
    that is not iterable at all becomes `{str(labels)}`.

    >>> sorted(as_label_set(["joy", "surprise"])), as_label_set("joy"), as_label_set(None)
    (['joy', 'surprise'], frozenset({'joy'}), frozenset())
    """
    if type(labels) is frozenset:
        return labels
    if labels is None:
        return frozenset()
    if isinstance(labels, str):
        return frozenset((labels,))
    try:
        return frozenset(labels)
    except Exception:  # unhashable members, not iterable, or an iterator that fails
        return _as_label_set_slow(labels)


def _as_label_set_slow(labels) -> frozenset:
    try:
        return frozenset(_safe_str(m) for m in labels)
    except Exception:  # not iterable (or fails while iterating): the whole value is one unknown label
        return frozenset((_safe_str(labels),))


def _safe_str(value) -> str:
    try:
        return str(value)
    except Exception:  # an object whose __str__ raises still has to become some label
        return f"<unprintable {type(value).__name__}>"


@lru_cache(maxsize=64)
def _similarity(label_space: str, sigma: float) -> dict[str, dict[str, float]]:
    """S_jk = exp(-||va_j - va_k||^2 / (2 sigma^2)) over the label space's valence-arousal table, cached."""
    va = VALENCE_AROUSAL[label_space]
    two_s2 = 2.0 * sigma * sigma
    return {
        j: {k: math.exp(-((vj[0] - vk[0]) ** 2 + (vj[1] - vk[1]) ** 2) / two_s2) for k, vk in va.items()}
        for j, vj in va.items()
    }


@lru_cache(maxsize=4096)
def _soft_gold(gold: frozenset, label_space: str, beta: float, sigma: float) -> dict[str, float]:
    """g_k = max(1_G(k), beta * max_{j in G} S_jk) for k in L, 1.0 for gold outside L. Cached."""
    sim = _similarity(label_space, float(sigma))
    known = [sim[j] for j in gold if j in sim]
    soft = {k: beta * max((row[k] for row in known), default=0.0) for k in LABEL_SPACES[label_space]}
    for j in gold:
        soft[j] = 1.0
    return soft


def _check_knobs(label_space, eps: float, beta: float, sigma: float) -> None:
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if beta > 0:
        if label_space is None:
            raise ValueError("smoothed_iou with beta > 0 needs a label_space (the similarity matrix is per dataset)")
        check_label_space(label_space)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0 when beta > 0, got {sigma!r}")


def smoothed_iou(
    pred, gold, label_space: str | None = None, eps: float = _D.eps, beta: float = _D.beta, sigma: float = _D.sigma
) -> float:
    """Smoothed multi-label IoU between a predicted set P and a gold set G (docs/method.md §3.1-3.2).

        sIoU(P, G) = (sum_{k in P|G} min(p_k, g_k) + eps) / (|P | G| + eps),   p = 1_P
        g_k = max(1_G(k), beta * max_{j in G} S_jk),   S_jk = exp(-||va_j - va_k||^2 / (2 sigma^2))

    Both sums run over P | G only (soft gold mass on labels neither side names is not counted), so the
    numerator is |P & G| + sum_{k in P - G} g_k and the denominator the plain union: an exact prediction scores
    exactly 1 for every beta, a wrong label earns at most beta * S of a hit, and the value lies in [0, 1]
    (> 0 with eps > 0). With beta = 0 (default) this is (|P & G| + eps) / (|P | G| + eps). Labels outside L
    count as wrong predictions (they are never in S). 0/0 (eps = 0, P = G = {}) is defined as 1.0.
    Thresholds on sIoU (flywheel) use beta = 0, so their meaning does not change with beta.
    Assumption: the paper gives no formula; additive eps smoothing and the valence-arousal neighbourhood
    (labels.VALENCE_AROUSAL, hand-placed on Russell's circumplex) are ours.

    >>> smoothed_iou({"joy"}, {"joy"}), round(smoothed_iou({"joy", "surprise"}, {"joy"}), 3)
    (1.0, 0.524)
    >>> round(smoothed_iou({"anger"}, {"joy"}), 3), round(smoothed_iou(set(), {"joy"}), 3)
    (0.048, 0.091)
    >>> [round(smoothed_iou({p}, {"disgust"}, "meld", beta=0.3), 3) for p in ("disgust", "anger", "joy")]
    [1.0, 0.133, 0.049]
    """
    p, g = as_label_set(pred), as_label_set(gold)
    if beta == 0 and eps > 0:  # hot path: plain set IoU
        inter = len(p & g)
        return (inter + eps) / (len(p) + len(g) - inter + eps)
    _check_knobs(label_space, eps, beta, sigma)
    hits = len(p & g)
    soft = sum(_soft_gold(g, label_space, beta, sigma).get(k, 0.0) for k in p - g) if beta > 0 else 0.0
    den = len(p) + len(g) - hits + eps
    return 1.0 if den == 0 else (hits + soft + eps) / den


def episode_reward(
    r_rec, r_con=None, r_und=None, w_rec: float = _D.w_rec, w_con: float = _D.w_con, w_und: float = _D.w_und
) -> float:
    """Weighted sum of the present episode terms (docs/method.md §3.4): R = w_rec r_rec + w_con r_con + w_und r_und.

    A term that is None (no self-play turn, no real next utterance) is skipped; the weights of the others are
    NOT renormalised. Why: (1) a skipped term then contributes exactly what a failed one does with the default
    r_invalid = 0, so a policy cannot raise its reward by making a term disappear (e.g. by breaking the reply so
    no consistency is scored) - renormalising would hand that term's weight to the easier recognition term;
    (2) R keeps one meaning across rows - each term adds at most its weight - so SELF-GRPO's std floor and
    lambda * c_i have the same scale in every group. Whether r_und exists is a property of the prompt, shared by
    the whole GRPO group, so skipping it shifts no advantage within a group.
    Assumption: the paper names the three signals, not how they combine; the weights are ours.

    >>> episode_reward(1.0), episode_reward(1.0, 0.5), episode_reward(1.0, 0.5, 1.0)
    (1.0, 1.25, 1.5)
    """
    total = w_rec * r_rec
    if r_con is not None:
        total += w_con * r_con
    if r_und is not None:
        total += w_und * r_und
    return float(total)


def is_ok(status) -> bool:
    """True iff a parse status (untrusted: any type) is exactly "ok"."""
    return isinstance(status, str) and status == "ok"


JUDGE_ERROR = "judge_error"  # the agent loop's status for a judge that never answered (infrastructure failure)


def score_episode(
    pred, pred_status, gold, label_space: str | None = None, turns=(), next_gold=None,
    r_invalid: float = _D.r_invalid, eps: float = _D.eps, beta: float = _D.beta, sigma: float = _D.sigma,
    w_rec: float = _D.w_rec, w_con: float = _D.w_con, w_und: float = _D.w_und,
) -> dict:
    """All reward terms of one episode (docs/method.md §3.4) from already-parsed label sets; never raises on labels.

        r_rec = sIoU(P_t, G_t)
        r_con = mean over self-play turns of sIoU(P-hat, E)   (None without turns)
        r_und = sIoU(E_first, G_{t+1})                          (None without turns or without a real next turn)
        score = episode_reward(r_rec, r_con, r_und)

    `turns`: (stated, stated_status, judged, judged_status) per self-play turn. A term whose input has a parse
    status other than "ok" scores r_invalid (for r_con: the stated or the judged status), except a turn whose
    judge never answered at the server (judged_status "judge_error"), which r_con leaves out. Returns floats
    score, r_rec, r_con, r_und (0.0 when absent) and has_con, has_und (1.0 / 0.0).
    Assumption: treating a judge parse failure like a responder failure (r_invalid), and leaving a judge server
    failure ("judge_error") out of r_con, are ours.

    >>> s = score_episode({"joy"}, "ok", {"joy"}, turns=[({"anger"}, "ok", {"fear"}, "ok")], next_gold={"anger"})
    >>> round(s["score"], 3), round(s["r_con"], 3), s["r_und"], s["has_und"]
    (1.274, 0.048, 1.0, 1.0)
    >>> s = score_episode({"joy"}, "ok", {"joy"}, turns=[({"anger"}, "ok", set(), "judge_error")], next_gold={"anger"})
    >>> s["has_con"], s["r_und"]      # the judge server failed: no r_con, r_und still scored
    (0.0, 1.0)
    """
    bad = float(r_invalid)
    r_rec = smoothed_iou(pred, gold, label_space, eps, beta, sigma) if is_ok(pred_status) else bad
    r_con = r_und = None
    judged_turns = [t for t in turns if not (isinstance(t[3], str) and t[3] == JUDGE_ERROR)]
    if judged_turns:
        r_con = sum(smoothed_iou(judged, stated, label_space, eps, beta, sigma) if is_ok(st) and is_ok(js) else bad
                    for stated, st, judged, js in judged_turns) / len(judged_turns)
    if turns:
        nxt = as_label_set(next_gold)
        if nxt:
            stated, st = turns[0][0], turns[0][1]
            r_und = smoothed_iou(stated, nxt, label_space, eps, beta, sigma) if is_ok(st) else bad
    return {
        "score": episode_reward(r_rec, r_con, r_und, w_rec, w_con, w_und),
        "r_rec": r_rec, "r_con": 0.0 if r_con is None else r_con, "r_und": 0.0 if r_und is None else r_und,
        "has_con": 0.0 if r_con is None else 1.0, "has_und": 0.0 if r_und is None else 1.0,
    }


def labels_to_mask(labels, label_space: str) -> int:
    """Bitmask of a label set: bit k set iff LABEL_SPACES[label_space][k] is in `labels`; unknown labels ignored.

    >>> labels_to_mask({"neutral", "joy"}, "meld"), labels_to_mask({"bogus"}, "meld")
    (17, 0)
    """
    if label_space not in _INDEX:
        check_label_space(label_space)
    return _mask_of(as_label_set(labels), label_space)


@lru_cache(maxsize=4096)
def _mask_of(labels: frozenset, label_space: str) -> int:
    index = _INDEX[label_space]
    return sum(1 << index[lab] for lab in labels if lab in index)


def mask_to_labels(mask, label_space: str) -> frozenset:
    """Inverse of labels_to_mask; bits beyond the label space are ignored, a negative or non-int mask is empty.

    >>> sorted(mask_to_labels(17, "meld")), mask_to_labels(1 << 40, "meld"), mask_to_labels(-1, "meld")
    (['joy', 'neutral'], frozenset(), frozenset())
    """
    labels = check_label_space(label_space)
    m = int(mask) if isinstance(mask, (int, np.integer)) else 0
    if m <= 0:
        return frozenset()
    return frozenset(lab for k, lab in enumerate(labels) if (m >> k) & 1)


def consensus(label_sets, label_space: str | None = None) -> frozenset:
    """Group consensus M = {k : v_k >= 0.5}, v_k = share of sets containing k; if empty, the argmax labels.

    All tied maxima are kept. With a label_space, labels outside it get no vote. When no set holds a (votable)
    label, M is empty.

    >>> sorted(consensus([{"joy"}, {"joy", "surprise"}, {"anger"}]))
    ['joy']
    >>> sorted(consensus([{"joy"}, {"anger"}, {"fear"}, set()]))
    ['anger', 'fear', 'joy']
    """
    if label_space is not None:
        check_label_space(label_space)
    votable = None if label_space is None else _INDEX[label_space]
    sets = [as_label_set(s) for s in label_sets]
    counts: dict = {}
    for s in sets:
        for lab in s:
            if votable is None or lab in votable:
                counts[lab] = counts.get(lab, 0) + 1
    n = len(sets)
    majority = frozenset(lab for lab, c in counts.items() if 2 * c >= n)
    if majority or not counts:
        return majority
    top = max(counts.values())
    return frozenset(lab for lab, c in counts.items() if c == top)


def group_consistency(label_sets, voters, label_space: str | None = None, eps: float = _D.eps) -> list[float]:
    """Per-episode agreement with the group consensus (docs/method.md §4.2): c_i = sIoU(P_i, M) for voters, else 0.

    M = consensus of the voters' sets only. `voters[i]` is true when episode i's recognizer answer parsed and
    its episode had no infrastructure failure; a non-voter gets c_i = 0, so a format failure (whose empty set
    would otherwise score sIoU({}, M) ~ 0.09) never earns more consistency than a parsed wrong label (~ 0.05).
    Assumption: the paper says "group-level consistency term" only; majority-vote consensus is ours.

    >>> [round(c, 3) for c in group_consistency([{"joy"}, {"joy"}, {"anger"}, set()], [1, 1, 1, 0])]
    [1.0, 1.0, 0.048, 0.0]
    """
    sets = [as_label_set(s) for s in label_sets]
    flags = [bool(v) for v in voters]
    if len(flags) != len(sets):
        raise ValueError(f"voters has {len(flags)} entries for {len(sets)} label sets")
    m = consensus([s for s, ok in zip(sets, flags) if ok], label_space)
    return [smoothed_iou(s, m, eps=eps) if ok else 0.0 for s, ok in zip(sets, flags)]


def _mask_bits(masks: np.ndarray, n_labels: int) -> np.ndarray:
    """(N,) int masks -> (N, n_labels) bool membership; negative masks are empty, higher bits ignored."""
    m = np.asarray(masks, dtype=np.int64).reshape(-1)
    m = np.where(m < 0, 0, m)
    return ((m[:, None] >> np.arange(n_labels, dtype=np.int64)[None, :]) & 1).astype(bool)


def group_consistency_from_masks(masks, voters, group_ids, n_labels: int, eps: float = _D.eps) -> np.ndarray:
    """Vectorised group_consistency over a whole batch of bitmasks, grouped by `group_ids` (e.g. verl uids).

    masks (N,) int, voters (N,) bool, group_ids (N,) any comparable values; returns (N,) float64 c_i, equal to
    group_consistency on each group's mask_to_labels sets (same eps, votes restricted to the n_labels bits):
    only voters vote, non-voters get 0. No loop over groups.

    >>> group_consistency_from_masks(np.array([1, 1, 2, 0, 4]), np.array([1, 1, 1, 0, 1]),
    ...                              np.array(["a", "a", "a", "a", "b"]), 3).round(3)
    array([1.   , 1.   , 0.048, 0.   , 1.   ])
    """
    if not 0 < n_labels <= 62:
        raise ValueError(f"n_labels must be in 1..62, got {n_labels!r}")
    bits = _mask_bits(masks, n_labels)
    vote = np.asarray(voters, dtype=bool).reshape(-1)
    if vote.shape != (len(bits),):
        raise ValueError(f"voters has shape {vote.shape} for {len(bits)} masks")
    _, inv = np.unique(np.asarray(group_ids), return_inverse=True)
    inv = inv.reshape(-1)
    n_groups = int(inv.max()) + 1 if inv.size else 0
    counts = np.zeros((n_groups, n_labels), dtype=np.int64)
    np.add.at(counts, inv[vote], bits[vote].astype(np.int64))
    sizes = np.bincount(inv[vote], minlength=n_groups)
    cons = (2 * counts >= sizes[:, None]) & (sizes[:, None] > 0)
    top = counts.max(axis=1, initial=0)
    fallback = (counts == top[:, None]) & (counts > 0)
    cons = np.where(cons.any(axis=1)[:, None], cons, fallback)
    m = cons[inv]
    inter = (bits & m).sum(axis=1) + eps
    union = (bits | m).sum(axis=1) + eps
    c = np.divide(inter, union, out=np.ones(len(bits)), where=union != 0)
    return np.where(vote, c, 0.0)


def component_means(infos) -> dict[str, float]:
    """Step means of the reward terms of `compute_score` dicts, for logging.

    r_con / r_und are averaged only over episodes where the term exists (has_con / has_und = 1); a term that
    exists nowhere in the step is left out rather than logged as 0.

    >>> component_means([{"r_rec": 1.0, "r_con": 0.5, "has_con": 1.0, "r_und": 0.0, "has_und": 0.0, "parse_ok": 1.0},
    ...                  {"r_rec": 0.0, "r_con": 0.0, "has_con": 0.0, "r_und": 0.0, "has_und": 0.0, "parse_ok": 0.0}])
    {'r_rec': 0.5, 'parse_ok': 0.5, 'r_con': 0.5}
    """
    infos = [info for info in infos if isinstance(info, dict)]
    if not infos:
        return {}
    out = {name: float(np.mean([float(info.get(name, 0.0)) for info in infos])) for name in ("r_rec", "parse_ok")}
    for name, flag in (("r_con", "has_con"), ("r_und", "has_und")):
        present = [float(info.get(name, 0.0)) for info in infos if info.get(flag) == 1.0]
        if present:
            out[name] = float(np.mean(present))
    return out
