"""SELF-GRPO advantages (docs/method.md §5): group-normalised episode reward plus group-level consistency.

How SELF-GRPO differs from verl 0.9.1's built-in `grpo` (`core_algos.compute_grpo_outcome_advantage`):

1. The score is r̃_i = r_i + λ·c_i: the episode reward plus λ (`consistency_weight`) times the episode's
   agreement c_i with its group's consensus label set (docs/method.md §4). λ = 0 or c = None gives verl's score.
2. The std in the denominator is floored, max(std_g, σ_min) (`std_floor`), so near-identical continuous
   rewards (0.500 vs 0.501) are not blown up to ±1. With σ_min = 0 it is std_g + ε, exactly as verl.
3. Advantages are clipped to [−A_max, A_max] (`adv_clip`); None or inf switches clipping off.
4. A singleton group gets A = 0 (verl gives it its raw score): no baseline, no signal.
5. Episodes that are not group members (`member` False: an infrastructure failure hit them, docs/method.md §5.3) get
   A = 0 and enter neither the mean nor the std of their group; a group left with one member is a singleton.
6. Vectorised over groups (one `pandas.factorize` + `index_add_`), no Python loop over uids; group moments in
   float64, the result in the reward dtype; the broadcast selects with the 0/1 mask instead of multiplying.
7. `per_role` (off by default): the recognizer's tokens and the responder's tokens of one episode get separate
   advantages, each group-normalised like the above: the recognizer's from its own reward term plus consistency
   (w_rec·r_rec + λ·c_i), the responder's from the rest of R (w_con·r_con + w_und·r_und). With one scalar per
   episode a correct recognition also rewards whatever the responder said, and the responder's lucky guess
   rewards a wrong recognition (`self_grpo_role_advantage`).

Everything else is verl's: score = Σ_t token_level_rewards, unbiased (n−1) sample std, `norm_by_std=False`
subtracts the mean only (Dr.GRPO), the scalar is broadcast over the response mask, returns = advantages.

Core module: torch, numpy and pandas only, no verl. The verl registration lives in `selfemo_verl/estimator.py`.

Paper: SELF-EMO (arXiv 2604.18003) names SELF-GRPO and a group-level consistency term.
Assumption: the paper body is not available; the formula above, the floor, the clip and the singleton rule
are this project's choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch


@dataclass(frozen=True)
class SelfGrpoKnobs:
    """SELF-GRPO's knobs with their defaults (docs/method.md §5): `algorithm.self_grpo` of selfemo_trainer.yaml.

    The one copy of these defaults in code: the keyword defaults below read `SELF_GRPO_DEFAULTS` (the registered
    estimator falls back to them under a plain verl YAML), and tests/test_config_on_cpu.py keeps them equal to the YAML.
    """

    consistency_weight: float = 0.2  # λ: weight of the group consistency c_i
    std_floor: float = 0.1  # σ_min: floor on the group std; 0 = verl's std + epsilon
    adv_clip: float | None = 3.0  # A_max: |A| bound; None (or inf) = no clipping
    epsilon: float = 1e-6  # added to the std when std_floor is 0 (verl's grpo epsilon)
    norm_by_std: bool = True  # divide by the (floored) std; False = mean-centring only (Dr.GRPO)
    per_role: bool = False  # separate advantages for the recognizer's and the responder's tokens


SELF_GRPO_DEFAULTS = SelfGrpoKnobs()
_D = SELF_GRPO_DEFAULTS  # short name for the keyword defaults below


def group_ids(index) -> tuple[torch.Tensor, int]:
    """Map arbitrary group labels (uid strings, ints) to contiguous ids 0..G-1.

    Shapes: index (bs,) -> ids (bs,) int64, and G.

    Ids follow first appearance (hash-based `pandas.factorize`, ~4x faster than `np.unique` on uuid strings).

    >>> ids, n = group_ids(np.array(["b", "a", "b"], dtype=object))
    >>> ids.tolist(), n
    ([0, 1, 0], 2)
    """
    codes, uniques = pd.factorize(np.asarray(index).reshape(-1), sort=False, use_na_sentinel=False)
    return torch.from_numpy(codes.astype(np.int64, copy=False)), len(uniques)


def _group_moments(values: torch.Tensor, ids: torch.Tensor, n_groups: int, weight: torch.Tensor):
    """Per-group mean, unbiased std (0 for singletons) and member count over rows with weight 1, in float64.

    Shapes: values, weight (bs,) (weight 0/1); returns three (G,) tensors. A group without members has count 0.
    """
    v = values.to(torch.float64)
    w = weight.to(torch.float64)
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=v.device)
    count = zeros.clone().index_add_(0, ids, w)
    mean = zeros.clone().index_add_(0, ids, v * w) / count.clamp_min(1.0)
    centred = (v - mean[ids]) * w
    sq = zeros.clone().index_add_(0, ids, centred * centred)
    std = torch.sqrt(sq / (count - 1.0).clamp_min(1.0))
    return mean, std, count


def _unclipped(scores, ids, n_groups, consistency, member, consistency_weight, std_floor, epsilon, norm_by_std):
    """Per-sample (r̃ − mean_g r̃) / max(std_g, σ_min) before clipping; 0 for non-members and singletons.

    Shapes: scores (bs,), member (bs,) bool or None (= every row); returns (bs,) float64.
    """
    shaped = scores.to(torch.float64)
    if consistency is not None and consistency_weight != 0.0:
        c = torch.as_tensor(consistency, dtype=torch.float64, device=shaped.device).reshape(-1)
        shaped = shaped + consistency_weight * c
    is_member = _member_mask(member, shaped)
    mean, std, count = _group_moments(shaped, ids, n_groups, is_member)
    centred = shaped - mean[ids]
    if norm_by_std:
        denom = std.clamp_min(std_floor) if std_floor > 0 else std + epsilon
        centred = centred / denom[ids]
    return torch.where(is_member & (count[ids] > 1), centred, torch.zeros_like(centred))


def _member_mask(member, like: torch.Tensor) -> torch.Tensor:
    """(bs,) bool tensor on `like`'s device from a list, numpy array or tensor (any device); None = every row."""
    if member is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    mask = torch.as_tensor(member).to(device=like.device, dtype=torch.bool).reshape(-1)
    if mask.shape != like.shape:
        raise ValueError(f"member has shape {tuple(mask.shape)} for {tuple(like.shape)} episodes")
    return mask


def _clip_bound(adv_clip) -> float | None:
    """None for 'no clipping' (None or +inf), else the positive bound."""
    return None if adv_clip is None or math.isinf(adv_clip) else float(adv_clip)


def _clip(scalar: torch.Tensor, adv_clip) -> torch.Tensor:
    """`scalar` clamped to [−A_max, A_max]; unchanged when clipping is off."""
    bound = _clip_bound(adv_clip)
    return scalar if bound is None else scalar.clamp(-bound, bound)


@torch.no_grad()
def self_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    consistency=None,
    member=None,
    *,
    consistency_weight: float = _D.consistency_weight,
    std_floor: float = _D.std_floor,
    adv_clip: float | None = _D.adv_clip,
    epsilon: float = _D.epsilon,
    norm_by_std: bool = _D.norm_by_std,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SELF-GRPO advantage, one scalar per episode broadcast over its response tokens.

        r̃_i = Σ_t r_{i,t} + λ·c_i
        A_i = clip((r̃_i − mean_g r̃) / max(std_g r̃, σ_min), −A_max, A_max)    (std_g + ε when σ_min = 0)
        A_i = 0 when episode i is not a member, or its group has one member; mean and std run over members.

    Shapes: token_level_rewards, response_mask (bs, L); index (bs,) group labels (uid); consistency (bs,)
    c_i in [0, 1] or None (= 0); member (bs,) bool or None (= every episode; False: infrastructure failure). Returns (advantages, returns), both (bs, L), the same tensor, as verl's grpo.
    `adv_clip=None` (or inf) disables clipping; `std_floor=0` gives verl's std + ε.

    Assumption: see the module docstring (the paper gives no formula).

    >>> r = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.5]])
    >>> a, _ = self_grpo_advantage(r, torch.ones(3, 2), ["u", "u", "v"], consistency_weight=0.0)
    >>> [round(x, 4) for x in a[:, 0].tolist()]     # ±(0.5 / 0.7071); the singleton "v" gets 0
    [0.7071, -0.7071, 0.0]
    >>> a, _ = self_grpo_advantage(r, torch.ones(3, 2), ["u", "u", "u"], None, [True, False, True],
    ...                            consistency_weight=0.0)
    >>> [round(x, 4) for x in a[:, 0].tolist()]     # the non-member gets 0 and is not in the mean or std
    [0.7071, 0.0, -0.7071]
    """
    scores = token_level_rewards.sum(dim=-1)
    ids, n_groups = group_ids(index)
    ids = ids.to(scores.device)
    scalar = _clip(_unclipped(scores, ids, n_groups, consistency, member, consistency_weight, std_floor, epsilon,
                              norm_by_std), adv_clip)
    # select, not multiply: same values for verl's 0/1 mask, ~1.5x faster than float * int64 on CPU
    advantages = torch.where(response_mask.bool(), scalar.to(token_level_rewards.dtype).unsqueeze(-1), 0.0)
    return advantages, advantages


@torch.no_grad()
def self_grpo_stats(
    scores: torch.Tensor,
    index,
    consistency=None,
    member=None,
    *,
    consistency_weight: float = _D.consistency_weight,
    std_floor: float = _D.std_floor,
    adv_clip: float | None = _D.adv_clip,
    epsilon: float = _D.epsilon,
    norm_by_std: bool = _D.norm_by_std,
) -> dict[str, float]:
    """Diagnostics of one SELF-GRPO step, vectorised like the estimator.

    - `zero_std_groups`: groups of ≥ 2 whose task score r is identical for every member (plain GRPO gives
      them no signal; only the consistency term can separate their episodes);
    - `adv_clip_frac`: share of episodes whose unclipped |A_i| exceeds A_max (0 when clipping is off);
    - `consistency_mean`: mean c_i over members (0 when consistency is None or there is no member).

    Only members (`member`, None = all) count: groups are their members, shares are over members.
    Shapes: scores (bs,) episode rewards; index (bs,); consistency (bs,) or None; member (bs,) bool or None.

    >>> s = self_grpo_stats(torch.tensor([1.0, 1.0, 0.0, 0.2]), ["a", "a", "b", "b"], [1.0, 0.5, 0.0, 0.5])
    >>> s["zero_std_groups"], s["consistency_mean"]
    (1.0, 0.5)
    """
    scores = scores.detach().cpu()  # diagnostics: a few scalars per episode
    keep = _member_mask(member, scores)
    ids, n_groups = group_ids(np.asarray(index)[keep.numpy()])
    v = scores[keep].to(torch.float64)
    c = None if consistency is None else torch.as_tensor(consistency).to("cpu", torch.float64).reshape(-1)[keep]
    gmax = torch.full((n_groups,), -math.inf, dtype=torch.float64).scatter_reduce(0, ids, v, "amax")
    gmin = torch.full((n_groups,), math.inf, dtype=torch.float64).scatter_reduce(0, ids, v, "amin")
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, ids, torch.ones_like(v))
    scalar = _unclipped(v, ids, n_groups, c, None, consistency_weight, std_floor, epsilon, norm_by_std)
    bound = _clip_bound(adv_clip)
    clipped = (scalar.abs() > bound).double().mean().item() if bound is not None and len(v) else 0.0
    return {
        "zero_std_groups": float(((gmax == gmin) & (count > 1)).sum().item()),
        "adv_clip_frac": clipped,
        "consistency_mean": float(c.mean()) if c is not None and c.numel() else 0.0,
    }


def recognizer_tokens(response_mask: torch.Tensor) -> torch.Tensor:
    """Which response tokens are the recognizer's answer: the trained tokens before the first untrained one.

    An episode's response is the recognizer's answer (mask 1), then the role switch (mask 0) and the
    responder's answer (mask 1), and so on (docs/method.md §6.1); a recognize-only episode is one answer and padding.
    Shapes: response_mask (bs, L) 0/1 -> (bs, L) bool.

    >>> recognizer_tokens(torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]])).int().tolist()
    [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    """
    trained = response_mask.bool()
    return trained & (torch.cumsum((~trained).to(torch.int32), dim=-1) == 0)


@torch.no_grad()
def self_grpo_role_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    recognizer_scores,
    consistency=None,
    member=None,
    *,
    consistency_weight: float = _D.consistency_weight,
    std_floor: float = _D.std_floor,
    adv_clip: float | None = _D.adv_clip,
    epsilon: float = _D.epsilon,
    norm_by_std: bool = _D.norm_by_std,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SELF-GRPO with one advantage per role (`per_role`): the recognizer's tokens and the responder's differ.

        A_rec_i  = SELF-GRPO of s_i = w_rec·r_rec_i (`recognizer_scores`), consistency c_i included
        A_resp_i = SELF-GRPO of R_i − s_i, without consistency (c_i measures the recognizer's agreement)
        token t of episode i gets A_rec_i on the recognizer's answer (`recognizer_tokens`), A_resp_i after it.

    Same groups, members, std floor and clip as `self_grpo_advantage`. Shapes: token_level_rewards,
    response_mask (bs, L); index, recognizer_scores, consistency, member (bs,).
    Assumption: the paper gives no formula; splitting the credit by role is this project's choice.

    >>> r = torch.tensor([[0.0, 0.0, 1.5], [0.0, 0.0, 0.0]])        # R = 1.5 (r_rec 1, responder 0.5) vs 0
    >>> a, _ = self_grpo_role_advantage(r, torch.tensor([[1, 0, 1], [1, 0, 1]]), ["u", "u"], [1.0, 0.0],
    ...                                 consistency_weight=0.0, adv_clip=None)
    >>> [[round(x, 4) for x in row] for row in a.tolist()]         # ±1/√2 per role, 0 on the role switch
    [[0.7071, 0.0, 0.7071], [-0.7071, 0.0, -0.7071]]
    """
    knobs = dict(consistency_weight=consistency_weight, std_floor=std_floor, epsilon=epsilon, norm_by_std=norm_by_std)
    scores = token_level_rewards.sum(dim=-1)
    rec = torch.as_tensor(recognizer_scores, dtype=scores.dtype, device=scores.device).reshape(-1)
    ids, n_groups = group_ids(index)
    ids = ids.to(scores.device)
    a_rec = _clip(_unclipped(rec, ids, n_groups, consistency, member, **knobs), adv_clip)
    a_resp = _clip(_unclipped(scores - rec, ids, n_groups, None, member, **knobs), adv_clip)
    dtype = token_level_rewards.dtype
    per_token = torch.where(recognizer_tokens(response_mask), a_rec.to(dtype).unsqueeze(-1),
                            a_resp.to(dtype).unsqueeze(-1))
    advantages = torch.where(response_mask.bool(), per_token, 0.0)
    return advantages, advantages
