"""Reward models and the reward-transform seam."""
from jaxrl_pref.rewards.transform import IdentityReward, RewardTransform, ScaledSum

__all__ = ["RewardTransform", "IdentityReward", "ScaledSum"]
