"""The hand-designed reward of named reward factors (:class:`FactorReward`) and a rollout's factors
(:func:`traj_factors`). The factors themselves, the factor sets and the factor envs are :mod:`envs.factors`."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from envs.factors import FactorSet


class FactorReward:
    """A :class:`~jaxrl_pref.rewards.RewardTransform` ``r = sum_k w_k * factor_k`` (the hand-designed reward).

    With the factor set's ground-truth weights it equals the task's own reward; with a one-hot ``weights`` times a
    direction it is "the top factor alone" (a baseline of the HERON study). Factors come from
    ``info["factors"]`` or, if absent, from :meth:`FactorSet.from_transition`.
    """

    def __init__(self, factor_set: FactorSet, weights: Sequence[float] | jax.Array | None = None):
        self.factor_set = factor_set
        self.weights = factor_set.weights if weights is None else jnp.asarray(weights, jnp.float32)
        if self.weights.shape != (len(factor_set),):
            raise ValueError(f"weights: need {len(factor_set)} values for {list(factor_set.names)}, "
                             f"got shape {self.weights.shape}")

    @classmethod
    def top_factor(cls, factor_set: FactorSet, name: str | None = None) -> "FactorReward":
        i = factor_set.index(name) if name else factor_set.ranking()[0]
        w = jnp.zeros(len(factor_set)).at[i].set(factor_set.factors[i].direction)
        return cls(factor_set, w)

    def init(self, key, spec):
        return ()

    def update(self, state, traj, key, axis_name=None):
        return state, {}

    def __call__(self, state, traj):
        f = traj_factors(self.factor_set, traj)
        r = f @ self.weights
        return r, {"reward/factor_weighted": r.mean()}


def traj_factors(factor_set: FactorSet, traj) -> jax.Array:
    """``[T, N, K]`` factors of a rollout: ``info["factors"]`` when the env reports them, else computed."""
    if isinstance(traj.info, Mapping) and "factors" in traj.info:
        return jnp.asarray(traj.info["factors"], jnp.float32)
    return factor_set.from_transition(traj)
