"""SELF-GRPO (selfemo_verl/advantage.py, its verl registration selfemo_verl/estimator.py): docs/method.md §5."""

import math
import statistics

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import selfemo_verl.advantage as advantage
from selfemo_verl.advantage import self_grpo_advantage, self_grpo_stats

NO_EXTRAS = dict(consistency_weight=0.0, std_floor=0.0, adv_clip=None)  # λ = 0, σ_min = 0, no clip


def _batch(seed, min_size=2, max_size=8, n_groups=12, length=16, binary=False):
    """Random outcome-reward batch: shuffled uid groups, random response lengths, reward at the last token."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(min_size, max_size + 1, (n_groups,), generator=g).tolist()
    uids = np.array([f"uid{k}" for k, s in enumerate(sizes) for _ in range(s)], dtype=object)
    order = torch.randperm(len(uids), generator=g).numpy()
    uids = uids[order]
    bs = len(uids)
    lengths = torch.randint(1, length + 1, (bs,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.int64)
    scores = torch.randint(0, 2, (bs,), generator=g).float() if binary else torch.rand(bs, generator=g) * 2
    rewards = torch.zeros(bs, length)
    rewards[torch.arange(bs), lengths - 1] = scores
    consistency = torch.rand(bs, generator=g).numpy()
    return rewards, mask, uids, consistency


def _verl_advantages(rewards, mask, uids, estimator, config=None, norm=True):
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
        non_tensors={"uid": uids.copy()},
    )
    out = compute_advantage(data, adv_estimator=estimator, norm_adv_by_std_in_grpo=norm, config=config)
    return out.batch["advantages"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("binary", [False, True])
def test_self_grpo_equals_verl_grpo_when_lambda_zero_floor_zero_no_clip(seed, binary):
    rewards, mask, uids, consistency = _batch(seed, binary=binary)
    expected = _verl_advantages(rewards, mask, uids, "grpo")
    # reason: consistency is ignored at λ = 0, so passing it must not matter
    ours, returns = self_grpo_advantage(rewards, mask, uids, consistency, **NO_EXTRAS)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert returns is ours  # verl's grpo returns the same tensor twice


@pytest.mark.parametrize("seed", range(3))
def test_self_grpo_equals_verl_grpo_without_std_normalisation(seed):
    rewards, mask, uids, _ = _batch(seed)
    expected = _verl_advantages(rewards, mask, uids, "grpo", norm=False)
    ours, _ = self_grpo_advantage(rewards, mask, uids, **NO_EXTRAS, norm_by_std=False)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_registered_self_grpo_through_verl_compute_advantage_equals_grpo(seed):
    import selfemo_verl.estimator  # noqa: F401  registers "self_grpo"

    rewards, mask, uids, _ = _batch(seed)
    config = OmegaConf.create({"self_grpo": {"consistency_weight": 0.0, "std_floor": 0.0, "adv_clip": math.inf}})
    ours = _verl_advantages(rewards, mask, uids, "self_grpo", config=config)
    torch.testing.assert_close(ours, _verl_advantages(rewards, mask, uids, "grpo"), atol=1e-6, rtol=0)


def test_std_floor_keeps_near_identical_rewards_small():
    rewards = torch.tensor([[0.500], [0.501]])
    a, _ = self_grpo_advantage(rewards, torch.ones(2, 1), ["u", "u"])
    # reason: std 0.00071 is floored to 0.1, so A = ±0.0005 / 0.1 = ±0.005
    assert a.abs().max().item() <= 0.01
    torch.testing.assert_close(a[:, 0], torch.tensor([-0.005, 0.005]), atol=1e-6, rtol=0)
    # reason: without the floor the 0.001 gap is blown up to ±1/sqrt(2)
    b, _ = self_grpo_advantage(rewards, torch.ones(2, 1), ["u", "u"], std_floor=0.0)
    assert b.abs().min().item() > 0.7


def test_consistency_separates_episodes_of_a_zero_variance_group():
    rewards = torch.ones(4, 3)  # every member got the same task reward
    c = np.array([1.0, 1.0, 1.0, 0.1 / 2.1])  # three agree with the consensus, one does not
    a, _ = self_grpo_advantage(rewards, torch.ones(4, 3), ["g"] * 4, c)
    assert (a[:3] > 0).all() and (a[3] < 0).all()  # reason: agreement is rewarded, disagreement penalised
    plain, _ = self_grpo_advantage(rewards, torch.ones(4, 3), ["g"] * 4, c, consistency_weight=0.0)
    assert plain.abs().max().item() == 0.0  # reason: without λ the group carries no signal


def test_worked_example_default_knobs():
    # reason: r̃ = [1, 0, 0, 0] + 0.2·[1, 1, 1, 0] = [1.2, 0.2, 0.2, 0]; mean 0.4; unbiased std = sqrt(0.88/3)
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    a, _ = self_grpo_advantage(rewards, torch.ones(4, 1), ["g"] * 4, [1.0, 1.0, 1.0, 0.0])
    std = math.sqrt(0.88 / 3)
    expected = torch.tensor([0.8, -0.2, -0.2, -0.4]) / std
    torch.testing.assert_close(a[:, 0], expected, atol=1e-6, rtol=0)


def test_singleton_group_gets_zero_advantage():
    rewards = torch.tensor([[0.0, 5.0], [1.0, 0.0], [0.0, 0.0]])
    a, _ = self_grpo_advantage(rewards, torch.ones(3, 2), ["alone", "pair", "pair"], [1.0, 0.0, 1.0])
    assert a[0].abs().max().item() == 0.0  # reason: no baseline, no signal (verl's grpo would give 5)
    assert a[1:].abs().min().item() > 0.0


def test_clip_bounds_advantages():
    # reason: one 1 among eight 0s: mean 1/9, unbiased std 1/3, so the outlier's unclipped A = (8/9)/(1/3) = 8/3
    rewards = torch.tensor([[1.0]] + [[0.0]] * 8)
    a, _ = self_grpo_advantage(rewards, torch.ones(9, 1), ["g"] * 9, consistency_weight=0.0, adv_clip=2.0)
    assert a.max().item() == pytest.approx(2.0)
    free, _ = self_grpo_advantage(rewards, torch.ones(9, 1), ["g"] * 9, consistency_weight=0.0, adv_clip=None)
    assert free.max().item() == pytest.approx(8 / 3, abs=1e-5)


def test_advantage_is_zero_outside_the_response_mask():
    rewards, mask, uids, c = _batch(11)
    a, _ = self_grpo_advantage(rewards, mask, uids, c)
    assert (a[mask == 0] == 0).all()
    assert a.dtype == rewards.dtype and a.shape == rewards.shape


def _loop_reference(scores, uids, c, lam, floor, clip, eps=1e-6, member=None):
    """Short, obviously-correct reference: one group at a time with the statistics module."""
    out = [0.0] * len(scores)
    member = [True] * len(scores) if member is None else member
    for u in set(uids):
        rows = [i for i, x in enumerate(uids) if x == u and member[i]]
        if len(rows) < 2:
            continue
        vals = [scores[i] + lam * c[i] for i in rows]
        mean, std = statistics.fmean(vals), statistics.stdev(vals)
        denom = max(std, floor) if floor > 0 else std + eps
        for i, v in zip(rows, vals):
            out[i] = min(max((v - mean) / denom, -clip), clip)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_matches_loop_reference(seed):
    rewards, mask, uids, c = _batch(seed, min_size=1, max_size=6, n_groups=20)
    rng = np.random.default_rng(seed)
    lam, floor, clip = float(rng.uniform(0, 1)), float(rng.choice([0.0, 0.1, 0.5])), 1.2
    a, _ = self_grpo_advantage(rewards, mask, uids, c, consistency_weight=lam, std_floor=floor, adv_clip=clip)
    ref = _loop_reference(rewards.sum(-1).tolist(), uids.tolist(), c.tolist(), lam, floor, clip)
    first = mask.argmax(dim=1)
    got = a[torch.arange(len(a)), first]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_non_members_get_zero_and_stay_out_of_their_groups_moments(seed):
    rewards, mask, uids, c = _batch(seed, min_size=1, max_size=6, n_groups=20)
    member = np.random.default_rng(seed).random(len(uids)) < 0.7
    a, _ = self_grpo_advantage(rewards, mask, uids, c, member, consistency_weight=0.3, std_floor=0.1, adv_clip=2.0)
    ref = _loop_reference(rewards.sum(-1).tolist(), uids.tolist(), c.tolist(), 0.3, 0.1, 2.0, member=member.tolist())
    got = a[torch.arange(len(a)), mask.argmax(dim=1)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32), atol=1e-5, rtol=0)
    assert (a[torch.as_tensor(~member)] == 0).all()  # reason: an infrastructure failure carries no signal


def test_a_failed_episode_does_not_change_its_groups_advantages():
    # reason: the same three answered episodes with and without a fourth, failed one whose score is 0
    rewards = torch.tensor([[1.0], [0.0], [0.5], [0.0]])
    with_failed, _ = self_grpo_advantage(rewards, torch.ones(4, 1), ["g"] * 4, None, [True, True, True, False])
    without, _ = self_grpo_advantage(rewards[:3], torch.ones(3, 1), ["g"] * 3)
    torch.testing.assert_close(with_failed[:3], without, atol=0, rtol=0)
    assert with_failed[3, 0] == 0.0
    # a group left with one member is a singleton: A = 0 for it too
    lone, _ = self_grpo_advantage(rewards[:2], torch.ones(2, 1), ["g", "g"], None, [True, False])
    assert lone.abs().max().item() == 0.0


def test_registered_wrapper_gives_feed_infra_rows_zero_and_reports_it():
    from selfemo_verl.estimator import ConsistencyFeed, consistency_feed, self_grpo

    uids = np.array(["g", "g", "g", "g"], dtype=object)
    feed = ConsistencyFeed(uids, np.zeros(4), np.array([True] * 4), np.array([False, False, True, False]))
    rewards = torch.tensor([[1.0], [0.0], [5.0], [0.5]])
    with consistency_feed(feed):
        a, _ = self_grpo(rewards, torch.ones(4, 1), config=None, index=uids)
    expected, _ = self_grpo_advantage(rewards[[0, 1, 3]], torch.ones(3, 1), uids[[0, 1, 3]], np.zeros(3))
    torch.testing.assert_close(a[[0, 1, 3]], expected, atol=0, rtol=0)
    assert a[2, 0] == 0.0 and feed.stats["infra_adv_abs_max"] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_stats_match_loop_reference(seed):
    rewards, mask, uids, c = _batch(seed, min_size=1, max_size=5, n_groups=30, binary=True)
    scores = rewards.sum(-1)
    stats = self_grpo_stats(scores, uids, c, adv_clip=1.0)
    groups = {u: [float(scores[i]) for i in range(len(uids)) if uids[i] == u] for u in set(uids)}
    zero_std = sum(1 for v in groups.values() if len(v) > 1 and len(set(v)) == 1)
    unclipped = _loop_reference(scores.tolist(), uids.tolist(), c.tolist(), 0.2, 0.1, math.inf)
    assert stats["zero_std_groups"] == zero_std
    assert stats["adv_clip_frac"] == pytest.approx(sum(abs(x) > 1.0 for x in unclipped) / len(uids))
    assert stats["consistency_mean"] == pytest.approx(float(np.mean(c)))


def test_stats_without_consistency_or_clip_are_zero():
    stats = self_grpo_stats(torch.tensor([0.0, 1.0]), ["a", "a"], None, adv_clip=None)
    assert stats == {"zero_std_groups": 0.0, "adv_clip_frac": 0.0, "consistency_mean": 0.0}


def test_registered_wrapper_reads_knobs_from_config_self_grpo():
    from selfemo_verl.estimator import self_grpo

    rewards, mask = torch.tensor([[0.500], [0.501]]), torch.ones(2, 1)
    a, _ = self_grpo(rewards, mask, config=OmegaConf.create({"self_grpo": {"std_floor": 0.0}}), index=["u", "u"])
    assert a.abs().min().item() > 0.7  # reason: floor switched off through the config
    with pytest.raises(ValueError, match="stdfloor"):
        self_grpo(rewards, mask, config={"self_grpo": {"stdfloor": 0.0}}, index=["u", "u"])
    with pytest.raises(ValueError, match="uid"):
        self_grpo(rewards, mask, config=None, index=None)


def test_registered_wrapper_takes_consistency_keyword():
    from selfemo_verl.estimator import self_grpo

    a, _ = self_grpo(torch.ones(2, 1), torch.ones(2, 1), config=None, index=["g", "g"], consistency=[1.0, 0.0])
    assert a[0, 0] > 0 > a[1, 0]


def test_feed_with_other_rows_raises():
    from selfemo_verl.estimator import ConsistencyFeed, consistency_feed, self_grpo

    feed = ConsistencyFeed(np.array(["b", "a"], dtype=object), np.array([1.0, 0.0]), np.array([True, True]),
                           np.array([False, False]))
    with consistency_feed(feed), pytest.raises(RuntimeError, match="uids do not match"):
        self_grpo(torch.ones(2, 1), torch.ones(2, 1), config=None, index=np.array(["a", "b"], dtype=object))


# ---------------- per_role: the recognizer's and the responder's tokens get their own advantages ----------------

def test_recognizer_tokens_end_at_the_first_untrained_token():
    mask = torch.tensor([
        [1, 1, 0, 0, 1, 1, 0],  # reason: recognizer 2 tokens, role switch, responder 2 tokens, padding
        [1, 1, 1, 1, 0, 0, 0],  # reason: recognize-only episode: one answer, then padding
        [1, 1, 0, 1, 0, 0, 1],  # reason: a cut answer's appended EOS (mask 0) also ends the recognizer's part
        [0, 0, 0, 0, 0, 0, 0],  # reason: the first call failed: one mask-0 EOS and padding, no trained token
    ])
    expected = [[1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [0] * 7]
    assert advantage.recognizer_tokens(mask).int().tolist() == expected


def _role_batch(seed, n_groups=10):
    """Self-play responses: recognizer answer (1s), role switch (0s), responder answer (1s), padding (0s)."""
    g = torch.Generator().manual_seed(seed)
    rewards, _, uids, consistency = _batch(seed, min_size=1, max_size=5, n_groups=n_groups, length=12)
    bs = len(uids)
    rec_len = torch.randint(0, 4, (bs,), generator=g)
    resp_len = torch.randint(0, 4, (bs,), generator=g)
    t = torch.arange(12)[None, :]
    mask = ((t < rec_len[:, None]) | ((t >= rec_len[:, None] + 2) & (t < rec_len[:, None] + 2 + resp_len[:, None])))
    rec_scores = torch.rand(bs, generator=g).numpy()
    return rewards, mask.to(torch.int64), uids, consistency, rec_scores, rec_len


@pytest.mark.parametrize("seed", range(4))
def test_per_role_gives_each_role_the_loop_reference_of_its_own_score(seed):
    rewards, mask, uids, c, rec_scores, rec_len = _role_batch(seed)
    member = np.random.default_rng(seed).random(len(uids)) < 0.8
    knobs = dict(consistency_weight=0.3, std_floor=0.1, adv_clip=1.5)
    a, _ = advantage.self_grpo_role_advantage(rewards, mask, uids, rec_scores, c, member, **knobs)
    scores = rewards.sum(-1).tolist()
    args = (0.3, 0.1, 1.5)
    # reason: the recognizer's score carries the consistency, the responder's (R minus it) does not
    ref_rec = _loop_reference(rec_scores.tolist(), uids.tolist(), c.tolist(), *args, member=member.tolist())
    ref_resp = _loop_reference([s - r for s, r in zip(scores, rec_scores)], uids.tolist(), [0.0] * len(uids), *args,
                               member=member.tolist())
    for i in range(len(uids)):
        for t in range(mask.shape[1]):
            want = 0.0 if not mask[i, t] else (ref_rec[i] if t < rec_len[i] else ref_resp[i])
            assert a[i, t].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_per_role_equals_self_grpo_on_recognize_only_episodes(seed):
    # reason: with no responder tokens and the whole R being the recognizer's, the split changes nothing
    rewards, mask, uids, c = _batch(seed)
    whole, _ = self_grpo_advantage(rewards, mask, uids, c)
    split, _ = advantage.self_grpo_role_advantage(rewards, mask, uids, rewards.sum(-1).numpy(), c)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)


def test_per_role_credits_a_right_recognition_and_a_wrong_reply_apart():
    # Two episodes of one prompt, tokens: recognizer 2, role switch 1, responder 2.
    # Episode 0: right recognition (w_rec·r_rec = 1.0), the responder scores nothing (R = 1.0).
    # Episode 1: wrong recognition (0.0), the responder's emotion is read back and fits (R = 0.75).
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 0, 1, 1]])
    rewards = torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0.75]])
    whole, _ = self_grpo_advantage(rewards, mask, ["u", "u"], consistency_weight=0.0)
    split, _ = advantage.self_grpo_role_advantage(rewards, mask, ["u", "u"], [1.0, 0.0], consistency_weight=0.0)
    # reason: one scalar per episode also rewards episode 0's empty reply and punishes episode 1's good one
    assert (whole[0, [3, 4]] > 0).all() and (whole[1, [3, 4]] < 0).all()
    # reason: per role, the recognizer tokens follow r_rec (0 wins), the responder tokens the rest (1 wins)
    assert (split[0, :2] > 0).all() and (split[1, :2] < 0).all()
    assert (split[0, 3:] < 0).all() and (split[1, 3:] > 0).all()
    assert split[:, 2].abs().sum() == 0


def test_registered_wrapper_per_role_reads_the_feeds_recognizer_scores():
    from selfemo_verl.estimator import ConsistencyFeed, consistency_feed, self_grpo

    uids = np.array(["g", "g", "g"], dtype=object)
    mask = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 0, 1]])
    rewards = torch.tensor([[0, 0, 1.0], [0, 0, 0.5], [0, 0, 1.25]])
    rec = np.array([1.0, 0.0, 1.0])
    feed = ConsistencyFeed(uids, np.zeros(3), np.ones(3, bool), np.zeros(3, bool), recognizer_scores=rec)
    config = OmegaConf.create({"self_grpo": {"per_role": True}})
    with consistency_feed(feed):
        a, _ = self_grpo(rewards, mask, config=config, index=uids)
    expected, _ = advantage.self_grpo_role_advantage(rewards, mask, uids, rec, np.zeros(3))
    torch.testing.assert_close(a, expected, atol=0, rtol=0)
    assert feed.stats is not None
    with pytest.raises(ValueError, match="per_role=true needs the recognizer's reward"):
        self_grpo(rewards, mask, config=config, index=uids)  # reason: plain verl has no feed
