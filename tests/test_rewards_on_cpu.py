"""selfemo_verl.rewards: smoothed IoU, episode reward, group consistency, bitmasks (docs/method.md §3, §4)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfemo_verl.labels import LABEL_SPACES, VALENCE_AROUSAL
from selfemo_verl.rewards import (
    as_label_set,
    consensus,
    episode_reward,
    group_consistency,
    group_consistency_from_masks,
    labels_to_mask,
    mask_to_labels,
    score_episode,
    smoothed_iou,
)

MELD = list(LABEL_SPACES["meld"])
meld_sets = st.frozensets(st.sampled_from(MELD + ["bogus", "Joy"]), max_size=5)
odd_values = st.recursive(
    st.none() | st.text(max_size=20) | st.integers() | st.floats() | st.binary(max_size=10) | st.booleans(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=10,
)


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ({"joy"}, {"joy"}, 1.0),  # reason: singleton hit is a perfect score
        ({"joy", "surprise"}, {"joy"}, 1.1 / 2.1),  # reason: one extra wrong label about halves the score
        ({"anger"}, {"joy"}, 0.1 / 2.1),  # reason: wrong single label gets eps/(2+eps), not exactly 0
        (set(), {"joy"}, 0.1 / 1.1),  # reason: empty prediction is defined, eps/(1+eps)
        (set(), set(), 1.0),  # reason: empty/empty is eps/eps
        ({"joy", "surprise"}, {"joy", "surprise"}, 1.0),  # reason: exact multi-label hit
        ({"joy"}, {"joy", "surprise"}, 1.1 / 2.1),  # reason: missing one of two gold labels
        ({"bogus"}, {"joy"}, 0.1 / 2.1),  # reason: unknown label counts as a wrong prediction
        (["joy", "joy"], ("joy",), 1.0),  # reason: containers are coerced to sets, duplicates collapse
    ],
)
def test_smoothed_iou_worked_values(pred, gold, expected):
    assert smoothed_iou(pred, gold) == pytest.approx(expected, abs=1e-12)


@given(meld_sets, meld_sets)
def test_smoothed_iou_is_symmetric_when_beta_zero(p, g):
    assert smoothed_iou(p, g) == pytest.approx(smoothed_iou(g, p))


@given(meld_sets, meld_sets, st.sampled_from([0.0, 0.3, 1.0]), st.sampled_from([0.0, 0.1, 1.0]))
def test_smoothed_iou_lies_in_unit_interval(p, g, beta, eps):
    s = smoothed_iou(p, g, "meld", eps=eps, beta=beta)
    assert 0.0 <= s <= 1.0 + 1e-12
    if eps > 0:
        assert s > 0


@given(meld_sets, meld_sets, st.sampled_from(MELD + ["bogus"]))
def test_adding_a_wrong_label_never_raises_the_score(p, g, extra):
    if extra in g:
        return
    assert smoothed_iou(p | {extra}, g) <= smoothed_iou(p, g) + 1e-12


@given(meld_sets, st.frozensets(st.sampled_from(MELD), max_size=3))
def test_adding_a_label_outside_the_space_never_raises_the_score_even_with_beta(p, g):
    kw = dict(label_space="meld", beta=0.3)
    assert smoothed_iou(p | {"bogus"}, g, **kw) <= smoothed_iou(p, g, **kw) + 1e-12


@given(meld_sets, meld_sets)
def test_beta_zero_equals_plain_set_iou_with_or_without_label_space(p, g):
    plain = (len(p & g) + 0.1) / (len(p | g) + 0.1)
    assert smoothed_iou(p, g, "meld", beta=0.0) == pytest.approx(plain)
    assert smoothed_iou(p, g) == pytest.approx(plain)


def _dense_reference(p, g, space, eps, beta, sigma):
    """Loop reference of docs/method.md §3.2: both sums over P ∪ G only."""
    va = VALENCE_AROUSAL[space]
    num = den = 0.0
    for k in set(p) | set(g):
        sims = [
            math.exp(-((va[j][0] - va[k][0]) ** 2 + (va[j][1] - va[k][1]) ** 2) / (2 * sigma**2))
            for j in g
            if j in va and k in va
        ]
        gk = max(1.0 if k in g else 0.0, beta * max(sims, default=0.0))
        pk = 1.0 if k in p else 0.0
        num += min(pk, gk)
        den += max(pk, gk)
    return (num + eps) / (den + eps)


@given(
    st.sampled_from(sorted(LABEL_SPACES)).flatmap(
        lambda sp: st.tuples(
            st.just(sp),
            st.frozensets(st.sampled_from(list(LABEL_SPACES[sp]) + ["bogus"]), max_size=4),
            st.frozensets(st.sampled_from(list(LABEL_SPACES[sp]) + ["bogus"]), max_size=3),
        )
    ),
    st.floats(0.05, 1.0),
    st.floats(0.2, 2.0),
)
def test_semantic_smoothing_matches_dense_loop_reference(case, beta, sigma):
    space, p, g = case
    expected = _dense_reference(p, g, space, 0.1, beta, sigma)
    assert smoothed_iou(p, g, space, beta=beta, sigma=sigma) == pytest.approx(expected, rel=1e-9)


def test_semantic_smoothing_gives_near_miss_more_credit_than_far_miss():
    near = smoothed_iou({"excited"}, {"happy"}, "iemocap", beta=0.3)
    far = smoothed_iou({"excited"}, {"sad"}, "iemocap", beta=0.3)
    assert near > far
    assert near > smoothed_iou({"excited"}, {"happy"})  # beta>0 lifts the near miss above the plain score


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("disgust", 1.0),  # reason: exact hit scores exactly 1 whatever beta (docs/method.md §3.2)
        ("anger", 0.133),  # reason: near miss: (0.3 * S(disgust, anger) + 0.1) / 2.1
        ("joy", 0.049),  # reason: far miss: S(disgust, joy) ~ 0.01, barely above eps / 2.1 = 0.048
    ],
)
def test_semantic_smoothing_worked_values_meld(pred, expected):
    assert smoothed_iou({pred}, {"disgust"}, "meld", beta=0.3, sigma=0.5) == pytest.approx(expected, abs=5e-4)


def _label_sets(labels, max_size):
    return [frozenset(c) for n in range(max_size + 1) for c in itertools.combinations(labels, n)]


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.7, 1.0])
def test_exact_is_one_and_every_other_prediction_scores_below_one_in_unit_interval(space, beta):
    # exhaustive over |P| <= 3, |G| <= 2 for every label space
    labels = LABEL_SPACES[space]
    for g in _label_sets(labels, 2):
        for p in _label_sets(labels, 3):
            score = smoothed_iou(p, g, space, beta=beta)
            if p == g:
                assert score == 1.0, (p, g, beta)  # reason: no soft mass outside P ∪ G is counted
            else:
                assert 0.0 <= score < 1.0, (p, g, beta, score)
            if beta == 0.0:
                inter = len(p & g)
                assert score == pytest.approx((inter + 0.1) / (len(p | g) + 0.1))  # reason: β = 0 unchanged


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
def test_single_label_misses_are_ordered_by_similarity(space):
    va, labels = VALENCE_AROUSAL[space], LABEL_SPACES[space]
    for gold in labels:
        dist = {p: (va[p][0] - va[gold][0]) ** 2 + (va[p][1] - va[gold][1]) ** 2 for p in labels if p != gold}
        by_distance = sorted(dist, key=dist.get)
        scores = [smoothed_iou({p}, {gold}, space, beta=0.3) for p in by_distance]
        # reason: closer on the valence-arousal plane -> more similar -> at least as much credit
        assert scores == sorted(scores, reverse=True), (gold, by_distance, scores)
        assert all(s < 1.0 for s in scores)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(beta=0.3),  # reason: the similarity matrix is per label space
        dict(beta=0.3, label_space="nope"),  # reason: unknown label space
        dict(eps=-0.1),  # reason: negative smoothing can make the ratio negative
        dict(beta=0.3, label_space="meld", sigma=0),  # reason: S needs sigma > 0
        dict(beta=1.5, label_space="meld"),  # reason: g_k must stay a membership degree in [0, 1]
    ],
)
def test_smoothed_iou_rejects_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        smoothed_iou({"joy"}, {"joy"}, **kwargs)


def test_as_label_set_treats_a_string_as_one_label_and_objects_as_unknown_labels():
    assert as_label_set("joy") == {"joy"}  # reason: not {'j','o','y'}
    assert as_label_set(np.array(["joy", "anger"])) == {"joy", "anger"}  # reason: parquet round-trips give arrays
    assert as_label_set(3) == {"3"}  # reason: not iterable -> one unknown label
    assert as_label_set([1, None]) == {1, None}  # reason: hashable non-labels are kept; they only count as wrong
    assert as_label_set([["joy"], "x"]) == {"['joy']", "x"}  # reason: an unhashable member -> all become strings


@pytest.mark.parametrize(
    "args, expected",
    [
        ((0.5,), 0.5),  # reason: only recognition present
        ((0.5, 1.0), 1.0),  # reason: 0.5 + 0.5*1.0, no renormalisation by (1 + 0.5)
        ((0.5, None, 1.0), 0.75),  # reason: absent r_con is skipped, r_und weight 0.25 kept as is
        ((1.0, 1.0, 1.0), 1.75),  # reason: maximum with default weights
        ((0.0, 0.0, 0.0), 0.0),  # reason: minimum with default weights
    ],
)
def test_episode_reward_worked_values(args, expected):
    assert episode_reward(*args) == pytest.approx(expected)


def test_episode_reward_skipping_a_term_equals_scoring_it_zero():
    assert episode_reward(0.7, None, None) == episode_reward(0.7, 0.0, 0.0)
    assert episode_reward(0.7, 1.0, w_con=2.0) == pytest.approx(2.7)


space_and_subset = st.sampled_from(sorted(LABEL_SPACES)).flatmap(
    lambda sp: st.tuples(st.just(sp), st.frozensets(st.sampled_from(LABEL_SPACES[sp])))
)


@given(space_and_subset)
def test_bitmask_round_trip(case):
    space, labels = case
    mask = labels_to_mask(labels, space)
    assert 0 <= mask < 2 ** len(LABEL_SPACES[space])
    assert mask_to_labels(mask, space) == labels


@given(st.integers(min_value=-(2**70), max_value=2**70))
def test_mask_to_labels_ignores_out_of_range_bits_and_never_raises(mask):
    labels = mask_to_labels(mask, "meld")
    expected = mask & 0b1111111 if mask > 0 else 0
    assert labels_to_mask(labels, "meld") == expected


@pytest.mark.parametrize("mask", [None, "17", 17.0, [1], np.int64(17), True])
def test_mask_to_labels_of_odd_types(mask):
    labels = mask_to_labels(mask, "meld")
    # reason: only real integers are masks; numpy ints count, True is 1
    expected = {np.int64(17): {"neutral", "joy"}, True: {"neutral"}}
    key = mask if isinstance(mask, (bool, np.integer)) else None
    assert labels == expected.get(key, frozenset())


def test_labels_to_mask_ignores_unknown_labels():
    assert labels_to_mask({"joy", "bogus", "Joy"}, "meld") == 1 << MELD.index("joy")


@pytest.mark.parametrize(
    "sets, expected",
    [
        ([{"joy"}, {"joy", "surprise"}, {"anger"}], {"joy"}),  # reason: joy 2/3 >= 0.5, others 1/3
        ([{"joy"}, {"anger"}], {"joy", "anger"}),  # reason: both exactly 0.5 -> both in
        ([{"joy"}, {"anger"}, {"fear"}], {"joy", "anger", "fear"}),  # reason: nobody >= 0.5, all tied maxima
        ([{"joy"}, {"joy", "fear"}, {"anger"}, {"sadness"}, set()], {"joy"}),  # reason: argmax fallback, 2/5
        ([set(), set()], set()),  # reason: no votes at all -> empty consensus
        ([], set()),  # reason: empty group
    ],
)
def test_consensus_examples(sets, expected):
    assert consensus(sets) == expected


def test_consensus_with_label_space_gives_unknown_labels_no_vote():
    assert consensus([{"bogus"}, {"bogus"}, {"joy"}], "meld") == {"joy"}
    assert consensus([{"bogus"}, {"bogus"}, {"joy"}]) == {"bogus"}


def test_group_consistency_differs_from_per_sample_scoring():
    # Gold is anger; the group mostly says joy. Per-sample sIoU rewards the lone right answer, consistency the
    # majority: the two signals point in opposite directions, which is why SELF-GRPO weights c_i by lambda.
    sets = [{"joy"}, {"joy"}, {"anger"}]
    per_sample = [smoothed_iou(s, {"anger"}) for s in sets]
    cons = group_consistency(sets, [True] * 3)
    assert per_sample == pytest.approx([0.1 / 2.1, 0.1 / 2.1, 1.0])
    assert cons == pytest.approx([1.0, 1.0, 0.1 / 2.1])


def test_an_unparsed_answer_gets_less_consistency_than_a_parsed_wrong_label():
    # reason (docs/method.md §4.2): the unparsed episode neither votes nor scores, so it gets 0, below the parsed
    # minority label's eps / (2 + eps) ~ 0.048; before the revision it got sIoU({}, M) ~ 0.09
    c = group_consistency([{"joy"}, {"joy"}, {"anger"}, set()], [True, True, True, False], "meld")
    assert c == pytest.approx([1.0, 1.0, 0.1 / 2.1, 0.0])
    assert c[3] < c[2]


def test_non_voters_do_not_move_the_consensus():
    # reason: three non-voting "anger" sets (infra failures) would otherwise be the majority
    c = group_consistency([{"joy"}, {"joy"}, {"anger"}, {"anger"}, {"anger"}], [1, 1, 0, 0, 0])
    assert c == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.0])


def test_group_consistency_when_nobody_votes_is_zero_for_everyone():
    assert group_consistency([set(), {"joy"}, set()], [False, False, False]) == [0.0, 0.0, 0.0]


def _loop_reference(masks, voters, gids, n_labels, eps):
    space_labels = [f"l{k}" for k in range(n_labels)]
    to_set = lambda m: frozenset(lab for k, lab in enumerate(space_labels) if m > 0 and (m >> k) & 1)  # noqa: E731
    out = np.zeros(len(masks))
    for g in dict.fromkeys(gids.tolist()):
        idx = np.flatnonzero(gids == g)
        out[idx] = group_consistency([to_set(int(masks[i])) for i in idx], voters[idx], eps=eps)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_group_consistency_from_masks_equals_loop_reference(seed):
    rng = np.random.default_rng(seed)
    n_labels = int(rng.integers(1, 8))
    n = int(rng.integers(1, 200))
    masks = rng.integers(-3, 2 ** (n_labels + 1), size=n)  # includes negative and out-of-range bits
    masks[rng.random(n) < 0.3] = 0  # parse failures
    voters = rng.random(n) < 0.7  # some unparsed or infra episodes, including non-zero masks that do not vote
    gids = np.array([f"uid{g}" for g in rng.integers(0, max(1, n // 5), size=n)], dtype=object)
    eps = float(rng.choice([0.0, 0.1, 0.5]))
    got = group_consistency_from_masks(masks, voters, gids, n_labels, eps=eps)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, _loop_reference(masks, voters, gids, n_labels, eps), rtol=1e-12)
    assert (got[~voters] == 0).all()


def test_group_consistency_from_masks_on_empty_batch():
    empty = np.array([], dtype=np.int64)
    assert group_consistency_from_masks(empty, empty.astype(bool), np.array([]), 7).shape == (0,)


def test_score_episode_components_and_invalid_statuses():
    turns = [({"joy"}, "ok", {"joy"}, "ok"), ({"anger"}, "ok", {"fear"}, "no_tag")]
    s = score_episode({"joy"}, "ok", {"joy"}, "meld", turns=turns, next_gold={"sadness"}, r_invalid=-0.5)
    assert s["r_rec"] == 1.0  # reason: exact hit
    assert s["r_con"] == pytest.approx((1.0 - 0.5) / 2)  # reason: mean of a hit and an unparsed judge
    assert s["r_und"] == pytest.approx(0.1 / 2.1)  # reason: first stated joy vs real next sadness
    assert s["score"] == pytest.approx(1.0 + 0.5 * 0.25 + 0.25 * 0.1 / 2.1)
    bad = score_episode({"joy"}, "too_many", {"joy"}, r_invalid=-0.5)
    assert (bad["r_rec"], bad["has_con"], bad["has_und"]) == (-0.5, 0.0, 0.0)  # reason: no turns -> absent


def test_score_episode_has_no_understanding_term_without_a_real_next_turn():
    s = score_episode({"joy"}, "ok", {"joy"}, turns=[({"joy"}, "ok", {"joy"}, "ok")], next_gold=[])
    assert (s["has_con"], s["has_und"], s["r_und"], s["score"]) == (1.0, 0.0, 0.0, 1.5)
