"""Random Network Distillation (Burda et al., 2018) as a reward transform.

The bonus of a step is how badly a trained *predictor* network matches a fixed, randomly initialised *target*
network on the observation the step led to::

    r_int[t] = mean_k (target(x[t+1])_k - predictor(x[t+1])_k) ** 2,   x = clip((obs - mu) / sigma, -5, 5)

``x[t+1]`` is ``traj.final_obs[t]``: the true next observation, also where an episode ended (the reset observation
would reward the start state instead). Observations seen often are predicted well and pay little; new ones pay more.

Choices (the paper's, unless said):
* observation normalisation by running mean/variance over every observation seen (merged across devices with
  ``axis_name``), clipped to [-5, 5];
* the bonus is divided by the running std of its *non-episodic discounted return* (``gamma_int``, default 0.99),
  which keeps its scale stable while the predictor improves. The return is accumulated within each rollout from
  0 (not carried across rollouts, which would tie the state to the env count and its sharding): with 128-step
  rollouts and gamma 0.99 this is close to the paper's running return;
* the predictor is trained on each rollout's next observations (``update_proportion`` of them, as the paper's
  0.25 with many envs), ``steps`` Adam steps on the whole batch;
* the paper learns the bonus with a second value head and a non-episodic return. Both forms are here, through the
  seam (:mod:`jaxrl_pref.rewards.bonus`): by default the bonus is added to the reward and one critic learns the sum
  episodically (a plain reward transform any agent can use); with ``--bonus-value-head`` it is a second reward
  stream (:class:`~jaxrl_pref.rewards.transform.Stream`, non-episodic, discount ``gamma_int``) that the PPO-family
  agents learn with its own value head (docs/exploration.md).

Array observations are used as they are; dict observations (NetHack) are cast to float, flattened and concatenated.
The state (target and predictor parameters, optimiser state, statistics) is a pytree in the runner
state: it vmaps over seeds, checkpoints and resumes bit-exactly like the rest.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl_pref.networks import MLP, orthogonal  # LAPACK-free: see its doc (vmapped seeds)


def flat_obs(obs, rank) -> jax.Array:
    """``[..., D]`` float32: each step's observation flattened (``rank``: its number of axes, a dict of them for dict
    observations, whose leaves are cast and concatenated in key order)."""
    if isinstance(obs, dict):
        return jnp.concatenate([flat_obs(obs[k], rank[k]) for k in sorted(obs)], axis=-1)
    lead = obs.shape[:obs.ndim - rank]
    return obs.reshape(lead + (-1,)).astype(jnp.float32)


def obs_layout(spec) -> tuple:
    """``(rank, dim)`` of an env spec's observations for :func:`flat_obs`: the per-step number of axes (a dict of
    them for dict observations) and the flattened size."""
    shape = spec.obs_shape
    if isinstance(shape, dict):
        return {k: len(v) for k, v in shape.items()}, int(sum(np.prod(v) for v in shape.values()))
    return len(shape), int(np.prod(shape))


class _Embed(nn.Module):
    hidden: Sequence[int]
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, kernel_init=orthogonal(np.sqrt(2)))(
            MLP(tuple(self.hidden), "relu")(x))


def _moments_merge(mean, var, count, b_mean, b_var, b_count):
    """Merges running (mean, var, count) with a batch's (parallel algorithm of Chan et al.)."""
    total = count + b_count
    delta = b_mean - mean
    new_mean = mean + delta * b_count / total
    m2 = var * count + b_var * b_count + jnp.square(delta) * count * b_count / total
    return new_mean, m2 / total, total


def obs_stats(dim: int) -> dict:
    """Running mean/variance of flattened observations (state entries ``obs_mean``, ``obs_var``, ``obs_count``)."""
    return {"obs_mean": jnp.zeros(dim), "obs_var": jnp.ones(dim), "obs_count": jnp.float32(1e-4)}


def update_obs_stats(state: dict, raw: jax.Array, axis_name: Optional[str] = None) -> dict:
    """``state`` with its observation statistics merged with the rows of ``raw`` ``[n, dim]`` (of every device along
    ``axis_name``: equal-sized shards, so the mean of the moments is the moments of the union)."""
    b_mean, b_var = raw.mean(0), raw.var(0)
    if axis_name is not None:
        b_sq = jax.lax.pmean(b_var + jnp.square(b_mean), axis_name)
        b_mean = jax.lax.pmean(b_mean, axis_name)
        b_var = b_sq - jnp.square(b_mean)
        b_count = raw.shape[0] * jax.lax.psum(1, axis_name)
    else:
        b_count = raw.shape[0]
    mean, var, count = _moments_merge(state["obs_mean"], state["obs_var"], state["obs_count"], b_mean, b_var,
                                      jnp.float32(b_count))
    return {**state, "obs_mean": mean, "obs_var": var, "obs_count": count}


def normalise_obs(state: dict, x: jax.Array) -> jax.Array:
    """``x`` standardised by the running statistics, clipped to [-5, 5] (RND's choice)."""
    return jnp.clip((x - state["obs_mean"]) / jnp.sqrt(state["obs_var"] + 1e-8), -5.0, 5.0)


class RND:
    """RND bonus (see module doc). ``RND(hidden=(64, 64), features=64, learning_rate=1e-4, ...)``; use it through
    ``ScaledSum(RND(...), ext_coef=1.0, int_coef=c, normalize=False)`` (it normalises itself)."""

    def __init__(self, hidden: Sequence[int] = (64, 64), features: int = 64, learning_rate: float = 1e-4,
                 update_proportion: float = 1.0, steps: int = 1, gamma_int: float = 0.99,
                 predictor_extra: int = 1):
        if not 0.0 < update_proportion <= 1.0:
            raise ValueError(f"RND: update_proportion must be in (0, 1], got {update_proportion}")
        self.target = _Embed(tuple(hidden), features)
        # the predictor gets one more hidden layer than the target, as in the paper (it must be able to fit it)
        self.predictor = _Embed(tuple(hidden) + (hidden[-1],) * predictor_extra, features)
        self.tx = optax.adam(learning_rate)
        self.update_proportion, self.steps, self.gamma_int = update_proportion, steps, gamma_int

    def init(self, key, spec) -> dict:
        k_t, k_p = jax.random.split(key)
        self._rank, dim = obs_layout(spec)
        x = jnp.zeros((1, dim))
        pred = self.predictor.init(k_p, x)
        return {"target": self.target.init(k_t, x), "predictor": pred, "opt": self.tx.init(pred), **obs_stats(dim),
                "ret_mean": jnp.float32(0.0), "ret_var": jnp.float32(1.0), "ret_count": jnp.float32(1e-4)}

    def _x(self, state, obs):
        return normalise_obs(state, flat_obs(obs, self._rank))

    def _error(self, target_params, pred_params, x):
        return jnp.mean(jnp.square(self.target.apply(target_params, x) - self.predictor.apply(pred_params, x)), -1)

    def update(self, state, traj, key, axis_name: Optional[str] = None):
        state, _, metrics = self._update(state, traj, key, axis_name)
        return state, metrics

    def update_and_reward(self, state, traj, key, axis_name: Optional[str] = None):
        """``update`` then ``__call__`` with one forward pass: the update's prediction error (updated predictor,
        updated statistics) is the one ``__call__`` computes."""
        state, err, metrics = self._update(state, traj, key, axis_name)
        bonus, m = self._scaled(state, err)
        return state, bonus, {**metrics, **m}

    def _update(self, state, traj, key, axis_name):
        obs = traj.final_obs
        raw = flat_obs(obs, self._rank)
        raw = raw.reshape((-1, raw.shape[-1]))
        state = update_obs_stats(state, raw, axis_name)
        x = self._x(state, obs).reshape((-1, raw.shape[-1]))
        mask = (jax.random.uniform(key, (x.shape[0],)) < self.update_proportion).astype(jnp.float32)

        def loss(p):
            err = self._error(state["target"], p, x)
            return jnp.sum(err * mask) / jnp.maximum(mask.sum(), 1.0)

        def step(carry, _):
            p, opt = carry
            value, grads = jax.value_and_grad(loss)(p)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            updates, opt = self.tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), value

        (pred, opt), losses = jax.lax.scan(step, (state["predictor"], state["opt"]), None, length=self.steps)
        state = {**state, "predictor": pred, "opt": opt}
        # the running std of the non-episodic discounted bonus return, per env, over this rollout
        err = self._error(state["target"], pred, self._x(state, obs))  # [T, N]
        _, rets = jax.lax.scan(lambda r, e: (self.gamma_int * r + e,) * 2, jnp.zeros(err.shape[1:]), err)
        r_mean, r_var, r_count = rets.mean(), rets.var(), jnp.float32(rets.size)
        if axis_name is not None:
            r_sq = jax.lax.pmean(r_var + jnp.square(r_mean), axis_name)
            r_mean = jax.lax.pmean(r_mean, axis_name)
            r_var = r_sq - jnp.square(r_mean)
            r_count = r_count * jax.lax.psum(1, axis_name)
        m, v, c = _moments_merge(state["ret_mean"], state["ret_var"], state["ret_count"], r_mean, r_var, r_count)
        state = {**state, "ret_mean": m, "ret_var": v, "ret_count": c}
        return state, err, {"rnd/loss": losses[-1], "rnd/obs_std": jnp.sqrt(state["obs_var"]).mean()}

    def __call__(self, state, traj):
        return self._scaled(state, self._error(state["target"], state["predictor"], self._x(state, traj.final_obs)))

    def _scaled(self, state, err):
        bonus = err / jnp.sqrt(state["ret_var"] + 1e-8)
        return bonus, {"rnd/bonus": bonus.mean(), "rnd/error": err.mean()}
