"""verl adapter for SELF-GRPO: registers `self_grpo` in verl's advantage-estimator registry.

Translation only; the math is `selfemo_verl.advantage.self_grpo_advantage`.

verl's `compute_advantage` calls a registered estimator with `token_level_rewards`, `response_mask`,
`config` (= `config.algorithm`) and `index` (= the prompt uids) and nothing else, so the per-episode
consistency c_i reaches the estimator in one of three ways, first match wins:

1. `consistency=` / `member=` keywords (direct calls, tests);
2. a `ConsistencyFeed` (c_i and which rows are group members) that `selfemo_verl.trainer.SelfEmoTrainer` sets around verl's advantage step for the
   same rows (checked: the feed's uids must equal `index`, row for row, or it raises);
3. neither: c_i = 0 (plain `verl.trainer.main_ppo` with `algorithm.adv_estimator=self_grpo`).

Knobs come from `config.self_grpo` (`selfemo_verl/config/selfemo_trainer.yaml` holds the defaults); a config
without `self_grpo` (plain verl YAML) uses `advantage.SELF_GRPO_DEFAULTS` (the keyword defaults of
`self_grpo_advantage`), which a test keeps equal to the YAML. verl's `algorithm.norm_adv_by_std_in_grpo` is not
read (`self_grpo.norm_by_std` is).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import numpy as np
import torch

from verl.trainer.ppo.core_algos import register_adv_est

from selfemo_verl.advantage import (SELF_GRPO_DEFAULTS, SelfGrpoKnobs, self_grpo_advantage, self_grpo_role_advantage,
                                   self_grpo_stats)

KNOBS = tuple(field.name for field in dataclasses.fields(SelfGrpoKnobs))  # the keys algorithm.self_grpo may hold


@dataclasses.dataclass
class ConsistencyFeed:
    """c_i for the rows of one advantage step, keyed by their uids; `stats` is filled by the estimator.

    `valid` marks real rows (False for verl's synthetic padding rows); `infra` marks real rows hit by an
    infrastructure failure (docs/method.md §3.5). Group members are the valid rows without `infra`.
    """

    uids: np.ndarray
    consistency: np.ndarray
    valid: np.ndarray
    infra: np.ndarray
    recognizer_scores: np.ndarray | None = None  # w_rec·r_rec per row, for `per_role` (None: not fed)
    stats: dict | None = None

    @property
    def member(self) -> np.ndarray:
        return self.valid & ~self.infra


_FEED: contextvars.ContextVar[ConsistencyFeed | None] = contextvars.ContextVar("selfemo_feed", default=None)


@contextlib.contextmanager
def consistency_feed(feed: ConsistencyFeed):
    """Make `feed` visible to `self_grpo` calls inside the block (same thread/context only)."""
    token = _FEED.set(feed)
    try:
        yield feed
    finally:
        _FEED.reset(token)


def self_grpo_knobs(config) -> dict:
    """The estimator knobs from `config.self_grpo` (an `algorithm` DictConfig or dict); unknown keys raise."""
    node = None if config is None else config.get("self_grpo")
    if node is None:
        return {}
    knobs = dict(node)
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in algorithm.self_grpo; expected {list(KNOBS)}")
    return knobs


def _feed_consistency(index) -> ConsistencyFeed | None:
    """The active feed, after checking it describes exactly these rows in this order."""
    feed = _FEED.get()
    if feed is None:
        return None
    if len(feed.uids) != len(index) or not np.array_equal(feed.uids, np.asarray(index)):
        raise RuntimeError(
            "self_grpo: the consistency feed's uids do not match the rows verl passed (order or count "
            f"differs: {len(feed.uids)} vs {len(index)}); verl's _compute_advantage changed? (pinned 0.9.1)"
        )
    return feed


@register_adv_est("self_grpo")
def self_grpo(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, index=None, **kwargs):
    """verl estimator `self_grpo` -> `selfemo_verl.advantage.self_grpo_advantage` (docs/method.md §5)."""
    if index is None:
        raise ValueError("self_grpo needs the prompt uids (index); verl passes non_tensor_batch['uid']")
    knobs = self_grpo_knobs(config)
    per_role = knobs.pop("per_role", SELF_GRPO_DEFAULTS.per_role)
    consistency, member = kwargs.get("consistency"), kwargs.get("member")
    recognizer_scores = kwargs.get("recognizer_scores")
    feed = _feed_consistency(index) if consistency is None else None
    if feed is not None:
        consistency, member, recognizer_scores = feed.consistency, feed.member, feed.recognizer_scores
    if per_role:
        if recognizer_scores is None:
            raise ValueError("algorithm.self_grpo.per_role=true needs the recognizer's reward per episode, which "
                             "selfemo_verl.main's trainer feeds; plain verl.trainer.main_ppo cannot")
        advantages, returns = self_grpo_role_advantage(token_level_rewards, response_mask, index, recognizer_scores,
                                                       consistency, member, **knobs)
    else:
        advantages, returns = self_grpo_advantage(token_level_rewards, response_mask, index, consistency, member,
                                                  **knobs)
    if feed is not None:
        feed.stats = _feed_stats(feed, token_level_rewards.sum(dim=-1), advantages, index, knobs)
    return advantages, returns


def _feed_stats(feed: ConsistencyFeed, scores: torch.Tensor, advantages: torch.Tensor, index, knobs) -> dict:
    """`self_grpo_stats` over the members, plus `infra_adv_abs_max`: max |A| over infra rows (0.0 when none)."""
    stats = self_grpo_stats(scores, index, feed.consistency, feed.member, **knobs)
    infra = torch.as_tensor(feed.infra, device=advantages.device)
    hit = advantages[infra].abs()
    stats["infra_adv_abs_max"] = float(hit.max().item()) if hit.numel() else 0.0
    return stats
