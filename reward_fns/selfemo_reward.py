"""SELF-EMO reward function file for verl: `reward.custom_reward_function.path=reward_fns/selfemo_reward.py`.

A thin re-export of `selfemo_verl.reward_fn.compute_score` (see that module for the contract); the same function is
reachable without this file as `reward.custom_reward_function.path=pkg://selfemo_verl.reward_fn`.
"""

from selfemo_verl.reward_fn import compute_score

__all__ = ["compute_score"]
