"""Functional environment wrappers written for the gymnax 1.0 step signature.

Every env here exposes::

    reset(key, params) -> (obs, state)
    step(key, state, action, params) -> (obs, state, reward, terminated, truncated, info)

``terminated`` means the MDP reached a terminal state (no bootstrapping); ``truncated`` means the episode
was cut by a time limit (bootstrap from the value of ``info["final_obs"]``, the true last observation).
After either, the returned ``obs``/``state`` already belong to the next episode (auto-reset).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnax.environments import spaces
from jax.custom_batching import custom_vmap


@custom_vmap
def any_in_batch(x) -> jax.Array:
    """``x.any()``, and under ``vmap`` the any over the mapped axis too: one unbatched bool. A ``lax.cond`` on it
    stays a branch under ``vmap`` over seeds (taken when any seed needs it; each branch still selects per element)
    instead of becoming a select that runs both branches every time, as a cond on a batched predicate does."""
    return jnp.any(x)


@any_in_batch.def_vmap
def _any_in_batch_vmap(axis_size, in_batched, x):
    return any_in_batch(x), False


def raw_keys(key):
    """Keys as a wrapped env's ``step_env``/``reset_env`` get them: raw ``uint32[..., 2]`` data. Our wrappers also
    take typed keys (``jaxrl_pref.prng.unrolled``: the same bits, hashed faster on CPU) and hash with them, but
    envs may store their key in their state (xminigrid, Craftax), which must keep one type across resets."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


class Wrapper:
    """Base wrapper: forwards unknown attributes (``batch_shape``, spaces...) to the wrapped env."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, name):
        return getattr(self._env, name)

    @property
    def unwrapped(self):
        return getattr(self._env, "unwrapped", self._env)

    def state_specs(self, split, replicated):
        """A pytree prefix of this env's state for sharding over devices: ``split`` (along the env axis) for
        per-env state, ``replicated`` for state shared by all envs (the normalisers' running moments)."""
        return split


class AutoReset(Wrapper):
    """Turns a gymnax ``step_env``/``reset_env`` pair into an auto-resetting 6-tuple step.

    Owns the episode-boundary semantics instead of relying on the wrapped env's ``step``: the time-limit check
    is the env's ``is_truncated`` (gymnax 1.0), reported separately from natural termination (``truncated`` is
    False whenever ``terminated`` is True).

    With ``num_envs`` set, the env is a batch of ``num_envs`` envs (leading axis on obs, state, reward, flags and
    actions) and ``step``/``reset`` take one key for the whole batch. The reset branch then runs only when some
    env finished (``lax.cond``), which on CPU is most of the cost of stepping cheap envs. Under ``vmap`` over
    seeds it stays a branch (:func:`any_in_batch`), taken when an env of any seed finished.
    """

    def __init__(self, env, num_envs: int | None = None):
        super().__init__(env)
        self.num_envs = num_envs
        self.batch_shape = () if num_envs is None else (num_envs,)

    def _map(self, fn, in_axes):
        return fn if self.num_envs is None else jax.vmap(fn, in_axes=in_axes)

    def _keys(self, key):
        """The wrapped env's keys (one per env, raw) from the batch's key."""
        return raw_keys(key if self.num_envs is None else jax.random.split(key, self.num_envs))

    def reset(self, key, params):
        return self._map(self._env.reset_env, (0, None))(self._keys(key), params)

    def step(self, key, state, action, params):
        key_step, key_reset = jax.random.split(key)
        obs_st, state_st, reward, terminated, info = self._map(self._env.step_env, (0, 0, 0, None))(
            self._keys(key_step), state, action, params)
        terminated = jnp.asarray(terminated, dtype=bool)
        truncated = jnp.asarray(self._map(self._env.is_truncated, (0, None))(state_st, params), bool) & ~terminated
        obs, state = self._reset_done(key_reset, terminated | truncated, obs_st, state_st, params)
        info = dict(info)
        info.pop("discount", None)
        info["final_obs"] = obs_st
        reward = jnp.reshape(jnp.asarray(reward, jnp.float32), self.batch_shape)
        return obs, state, reward, terminated, truncated, info

    def _reset_done(self, key, done, obs_st, state_st, params):
        """``(obs, state)`` after a step: the finished envs (``done``) replaced by fresh ones (generated only when
        some env finished, for a batch)."""
        def with_reset(_):
            obs_re, state_re = self.reset(key, params)
            return where_done(done, obs_re, obs_st), where_done(done, state_re, state_st)

        if self.num_envs is None:
            return with_reset(None)
        return jax.lax.cond(any_in_batch(done), with_reset, lambda _: (obs_st, state_st), None)


def where_done(done, new, old):
    """Pytree ``new`` where ``done`` (``[N]`` or a scalar) else ``old``, broadcasting ``done`` over trailing axes."""
    return jax.tree.map(lambda a, b: jnp.where(jnp.reshape(done, done.shape + (1,) * (jnp.ndim(a) - done.ndim)), a, b),
                        new, old)


class FlattenObservation(Wrapper):
    """Flattens array observations to float32 vectors (the final observation too)."""

    def observation_space(self, params):
        space = self._env.observation_space(params)
        if not isinstance(space, spaces.Box):
            raise TypeError(f"FlattenObservation needs a Box observation space, got {type(space).__name__}")
        return spaces.Box(jnp.reshape(space.low, (-1,)) if np.ndim(space.low) else space.low,
                          jnp.reshape(space.high, (-1,)) if np.ndim(space.high) else space.high,
                          (int(np.prod(space.shape)),), jnp.float32)

    def _flat(self, x):
        return jnp.reshape(x, self.batch_shape + (-1,)).astype(jnp.float32)

    def reset(self, key, params):
        obs, state = self._env.reset(key, params)
        return self._flat(obs), state

    def step(self, key, state, action, params):
        obs, state, reward, terminated, truncated, info = self._env.step(key, state, action, params)
        info = {**info, "final_obs": self._flat(info["final_obs"])}
        return self._flat(obs), state, reward, terminated, truncated, info


@struct.dataclass
class EpisodeStatsState:
    env_state: Any
    episode_return: jax.Array
    episode_length: jax.Array


class EpisodeStats(Wrapper):
    """Tracks undiscounted episode return and length of the *unmodified* reward.

    ``info["episode_done"]`` is True on the step an episode ended (terminated or truncated), with
    ``info["episode_return"]`` / ``info["episode_length"]`` holding that episode's totals (0 otherwise).
    Place it inside reward-changing wrappers so it reports the true task return.
    """

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        zeros = jnp.zeros(self.batch_shape, jnp.float32)
        return obs, EpisodeStatsState(env_state, zeros, zeros.astype(jnp.int32))

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        done = terminated | truncated
        ret = state.episode_return + reward
        length = state.episode_length + 1
        info = {**info, "episode_done": done,
                "episode_return": jnp.where(done, ret, 0.0),
                "episode_length": jnp.where(done, length, 0)}
        new = EpisodeStatsState(env_state, jnp.where(done, 0.0, ret), jnp.where(done, 0, length))
        return obs, new, reward, terminated, truncated, info


class ClipAction(Wrapper):
    """Clips continuous actions to the Box bounds before they reach the env (the policy keeps the raw sample)."""

    def step(self, key, state, action, params):
        space = self._env.action_space(params)
        return self._env.step(key, state, jnp.clip(action, space.low, space.high), params)


@struct.dataclass
class RunningMoments:
    mean: jax.Array
    var: jax.Array
    count: jax.Array

    @classmethod
    def create(cls, shape=()):
        return cls(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.float32(1e-4))

    def update(self, x, batch_ndim: int = 0, axis_name: Optional[str] = None):
        """Merges samples ``x`` (Chan et al. parallel update). The first ``batch_ndim`` axes of ``x`` are a batch
        of samples (a batched env's ``[num_envs]`` axis: statistics shared by all envs, as in gym's VecNormalize);
        with ``batch_ndim=0`` ``x`` is one sample. With ``axis_name`` (a device axis; every device holding as many
        samples) the batch is the samples of all devices, so every device ends with the same moments."""
        axes = tuple(range(batch_ndim))
        n = float(np.prod(x.shape[:batch_ndim])) if batch_ndim else 1.0
        b_mean = jnp.mean(x, axis=axes) if axes else x
        b_var = jnp.var(x, axis=axes) if axes else jnp.zeros_like(x)
        if axis_name is not None:
            g_mean = jax.lax.pmean(b_mean, axis_name)
            b_var = jax.lax.pmean(b_var + b_mean * b_mean, axis_name) - g_mean * g_mean
            b_mean, n = g_mean, n * jax.lax.psum(1, axis_name)
        delta = b_mean - self.mean
        count = self.count + n
        mean = self.mean + delta * n / count
        m2 = self.var * self.count + b_var * n + delta * delta * self.count * n / count
        return RunningMoments(mean, m2 / count, count)


@struct.dataclass
class NormObsState:
    env_state: Any
    moments: RunningMoments


class NormalizeObservation(Wrapper):
    """Normalises observations with a running mean/std (shared by the envs of a batch, and with ``axis_name`` by
    the envs of every device on that axis); clips to +-``clip``."""

    def __init__(self, env, clip: float = 10.0, axis_name: Optional[str] = None):
        super().__init__(env)
        self.clip, self.axis_name = clip, axis_name

    def state_specs(self, split, replicated):
        return NormObsState(self._env.state_specs(split, replicated), replicated)

    def _norm(self, m, obs):
        return jnp.clip((obs - m.mean) / jnp.sqrt(m.var + 1e-8), -self.clip, self.clip)

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        nb = len(self.batch_shape)
        m = RunningMoments.create(obs.shape[nb:]).update(obs, nb, self.axis_name)
        return self._norm(m, obs), NormObsState(env_state, m)

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        m = state.moments.update(obs, len(self.batch_shape), self.axis_name)
        info = {**info, "final_obs": self._norm(m, info["final_obs"])}
        return self._norm(m, obs), NormObsState(env_state, m), reward, terminated, truncated, info


@struct.dataclass
class NormRewState:
    env_state: Any
    moments: RunningMoments
    discounted_return: jax.Array


class NormalizeReward(Wrapper):
    """Scales rewards by the running std of the discounted return (as in common PPO implementations); the std is
    shared by the envs of a batch, and with ``axis_name`` by the envs of every device on that axis."""

    def __init__(self, env, gamma: float = 0.99, clip: float = 10.0, axis_name: Optional[str] = None):
        super().__init__(env)
        self.gamma, self.clip, self.axis_name = gamma, clip, axis_name

    def state_specs(self, split, replicated):
        return NormRewState(self._env.state_specs(split, replicated), replicated, split)

    def reset(self, key, params):
        obs, env_state = self._env.reset(key, params)
        return obs, NormRewState(env_state, RunningMoments.create(),
                                 jnp.zeros(self.batch_shape, jnp.float32))

    def step(self, key, state, action, params):
        obs, env_state, reward, terminated, truncated, info = self._env.step(key, state.env_state, action, params)
        ret = state.discounted_return * self.gamma + reward
        m = state.moments.update(ret, len(self.batch_shape), self.axis_name)
        done = terminated | truncated
        scaled = jnp.clip(reward / jnp.sqrt(m.var + 1e-8), -self.clip, self.clip)
        new = NormRewState(env_state, m, jnp.where(done, 0.0, ret))
        return obs, new, scaled, terminated, truncated, info
