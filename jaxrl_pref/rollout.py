"""In-jit rollout over a vector of JAX envs, and the Transition pytree every agent learns from."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from envs.wrappers import any_in_batch
from jaxrl_pref.recurrent import RecurrentState


@struct.dataclass
class Transition:
    """One step for a batch of envs. Leaves are ``[num_envs, ...]`` per step, ``[T, num_envs, ...]`` stacked.

    ``final_obs`` is the true observation the step led to (before any auto-reset); for steps that did not
    end an episode it equals the next observation. ``info`` carries what reward models need (episode
    statistics, messages, reward factors...). ``policy_state``: for a recurrent policy, the
    :class:`~jaxrl_pref.recurrent.RecurrentState` entering the step (the core's carry before any reset, and
    whether the step starts an episode); ``()`` for a feed-forward one.
    """
    obs: Any
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: Any
    info: dict
    policy_state: Any = ()

    @property
    def done(self):
        return self.terminated | self.truncated


PolicyFn = Callable[[Any, jax.Array], tuple]  # (obs, key) -> (action, log_prob, value)


def collect(env, env_params, policy: PolicyFn, env_state, obs, key, num_steps: int,
            keep_info: tuple[str, ...] | None = None, policy_state: Any = ()):
    """Steps a batched env (``envs.make(..., num_envs=N)``) for ``num_steps`` steps with ``policy`` in ``lax.scan``.

    Returns ``(env_state, obs, traj)`` with ``traj`` a time-major :class:`Transition`. ``keep_info`` selects the
    info keys stored (default: all except ``final_obs``, which is stored as a field).

    A recurrent policy: pass its ``policy_state`` (a :class:`~jaxrl_pref.recurrent.RecurrentState`); ``policy``
    is then called ``policy(obs, key, state) -> (action, log_prob, value, carry)``, the state entering each step
    is stored in ``traj.policy_state`` (the next one's ``start`` is the step's ``done``), and the state after the
    rollout is returned too: ``(env_state, obs, traj, policy_state)``.
    """
    recurrent = isinstance(policy_state, RecurrentState)

    def step(carry, keys):
        env_state, obs, ps = carry
        if recurrent:
            action, log_prob, value, core = policy(obs, keys[0], ps)
        else:
            action, log_prob, value = policy(obs, keys[0])
        next_obs, env_state, reward, terminated, truncated, info = env.step(keys[1], env_state, action, env_params)
        final_obs = info.pop("final_obs")
        if keep_info is not None:
            info = {k: info[k] for k in keep_info}
        tr = Transition(obs, action, log_prob, value, reward, terminated, truncated, final_obs, info,
                        ps if recurrent else ())
        next_ps = RecurrentState(core, terminated | truncated) if recurrent else ()
        return (env_state, next_obs, next_ps), tr

    # All of the rollout's keys in one vectorised split: per-step splitting costs about as much as a cheap env step.
    keys = jax.random.split(key, (num_steps, 2))
    (env_state, obs, ps), traj = jax.lax.scan(step, (env_state, obs, policy_state), keys)
    return (env_state, obs, traj, ps) if recurrent else (env_state, obs, traj)


def next_values(traj: Transition, last_value, value_fn: Callable | None):
    """Value of the true next observation for every step of ``traj`` (``[T, N]``).

    Values may carry a trailing axis of value heads (``[T, N, K]``). Non-final steps use the next step's stored value; the last step uses ``last_value``; truncated steps use
    ``value_fn(final_obs)`` (one batched call for the whole rollout) when given, else the reset observation's
    value is *not* used and the bootstrap falls back to 0 (as for termination). Terminated steps are zeroed by
    the advantage code, so their entry does not matter.
    """
    nxt = jnp.concatenate([traj.value[1:], last_value[None]], axis=0)
    truncated = traj.truncated.reshape(traj.truncated.shape + (1,) * (nxt.ndim - traj.truncated.ndim))
    if value_fn is None:
        return jnp.where(truncated, 0.0, nxt)
    # Evaluated only when some step was truncated (of any seed, under vmap: a real branch either way).
    final_v = jax.lax.cond(any_in_batch(traj.truncated), value_fn, lambda o: jnp.zeros_like(nxt), traj.final_obs)
    return jnp.where(truncated, final_v, nxt)


STEP_FRACTIONS = {"hack": "hack_frac"}
"""Per-step 0/1 info keys logged as their mean over every step of the rollout (all envs; all devices on
``axis_name``), not over finished episodes: ``info["hack"]`` (a captioned task's farmable caption fired on the step,
:class:`envs.captions.Captioned`) -> ``hack_frac``, the fraction of env steps spent on the farmable event."""


def episode_metrics(info: dict, axis_name: str | None = None) -> dict:
    """Mean return/length of the episodes that finished in ``info`` (NaN when none did), the mean of every other
    ``episode_*`` key over them (``episode_success``...), and for the keys of :data:`STEP_FRACTIONS` present in
    ``info`` their mean over all steps (``hack_frac``)."""
    done = info["episode_done"].astype(jnp.float32)
    sums = {"n": done.sum(), "r": (info["episode_return"] * done).sum(),
            "l": (info["episode_length"] * done).sum()}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    n = sums["n"]
    safe = jnp.maximum(n, 1.0)
    nan = jnp.float32(jnp.nan)
    out = {"episode_return": jnp.where(n > 0, sums["r"] / safe, nan),
           "episode_length": jnp.where(n > 0, sums["l"] / safe, nan),
           "episodes": n}
    for k in info:
        if k.startswith("episode_") and k not in ("episode_done", "episode_return", "episode_length"):
            v = (info[k] * done).sum()
            if axis_name is not None:
                v = jax.lax.psum(v, axis_name)
            out[k] = jnp.where(n > 0, v / safe, nan)
    for k, name in STEP_FRACTIONS.items():
        if k in info:
            flags = jnp.asarray(info[k], jnp.float32)
            hits, steps = flags.sum(), jnp.float32(flags.size)
            if axis_name is not None:
                hits, steps = jax.lax.psum((hits, steps), axis_name)
            out[name] = hits / steps
    return out
