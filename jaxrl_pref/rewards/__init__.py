"""Reward models and the reward-transform seam.

ONI's message reward models (import them from their modules): :mod:`~jaxrl_pref.rewards.retrieval` (labels by
message hash in jit), :mod:`~jaxrl_pref.rewards.classification` (P(helpful), BCE), :mod:`~jaxrl_pref.rewards.ranking`
(Bradley-Terry), shaped into an intrinsic reward by :mod:`~jaxrl_pref.rewards.shaping`.

HERON's pieces: :mod:`~jaxrl_pref.rewards.factors` (named reward factors, factor envs, MiniHack factors,
``FactorReward``), :mod:`~jaxrl_pref.rewards.hierarchy` (vmapped hierarchical comparison) and
:mod:`~jaxrl_pref.rewards.preference` (the online Bradley-Terry preference reward model, a RewardTransform).
"""
from jaxrl_pref.rewards.transform import IdentityReward, RewardTransform, ScaledSum, Stream, reward_streams

__all__ = ["RewardTransform", "IdentityReward", "ScaledSum", "Stream", "reward_streams"]
