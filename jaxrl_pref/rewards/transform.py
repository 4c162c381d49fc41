"""The reward-transform seam: what an agent learns from is ``transform(state, traj)``, not the raw env reward.

A transform owns a pytree ``state`` (reward-model parameters, optimiser state, normalisation statistics...) that
lives in the agent's runner state. Each iteration the agent calls, in this order::

    state, m1 = transform.update(state, traj, key, axis_name)   # learn the reward model (may be a no-op)
    reward, m2 = transform(state, traj)                          # [T, N] reward used for advantages

``traj`` is the time-major :class:`jaxrl_pref.rollout.Transition` batch; ``traj.reward`` is the env reward. The
agent makes both calls through :func:`update_and_reward`: a transform whose ``update`` already computes the reward it
will return (E3B's episodic scan, RND's prediction error, a wrapper's normalising statistics) offers the pair as one
method, ``update_and_reward``, and computes it once (XLA does not merge two equal scans).
Metrics returned by both are logged with the agent's metrics (``reward/...``). A transform whose state arrays may
change shape during a run (ONI's growing message table) says which with an optional ``resizable(path) -> bool``;
the runner restores those at their checkpointed shape.

Several reward streams: a transform with a ``streams`` attribute (a tuple of :class:`Stream`, more than one)
returns ``[T, N, K]``, one column per stream. A PPO-family agent then gives each stream its own value head and
return (each stream's own discount, episodic or not) and adds their advantages (:func:`reward_streams`); RND's
non-episodic intrinsic return (``--bonus rnd --bonus-value-head``) is the use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp


class RewardTransform(Protocol):
    def init(self, key: jax.Array, spec: Any) -> Any: ...

    def update(self, state: Any, traj, key: jax.Array, axis_name: str | None = None) -> tuple[Any, dict]: ...

    def __call__(self, state: Any, traj) -> tuple[jax.Array, dict]: ...


def update_and_reward(transform, state, traj, key: jax.Array, axis_name: str | None = None):
    """``update`` then ``__call__`` on the same rollout: ``(state, reward, metrics)`` (both calls' metrics; the
    call's win a name clash). Uses the transform's own ``update_and_reward`` when it has one (same results, the work
    shared)."""
    fused = getattr(transform, "update_and_reward", None)
    if fused is not None:
        return fused(state, traj, key, axis_name)
    state, m1 = transform.update(state, traj, key, axis_name)
    reward, m2 = transform(state, traj)
    return state, reward, {**m1, **m2}


@dataclasses.dataclass(frozen=True)
class Stream:
    """One reward stream of a multi-stream transform: it gets its own value head and return."""
    name: str
    episodic: bool = True
    """False: the stream's return runs on across episode ends (Burda et al.'s intrinsic return): no cut at
    termination or truncation, the next step's value (the new episode's first observation) is bootstrapped."""
    gamma: Optional[float] = None
    """The stream's discount; None: the agent's gamma."""


SINGLE = (Stream("reward"),)


def reward_streams(transform) -> tuple[Stream, ...]:
    """The reward streams ``transform`` returns (one, :data:`SINGLE`, unless it declares ``streams``)."""
    streams = tuple(getattr(transform, "streams", None) or SINGLE)
    if not all(isinstance(s, Stream) for s in streams):
        raise TypeError(f"{type(transform).__name__}.streams must be a tuple of Stream, got {streams!r}")
    return streams


class IdentityReward:
    """Plain RL: the learning reward is the env reward."""

    def init(self, key, spec):
        return ()

    def update(self, state, traj, key, axis_name=None):
        return state, {}

    def __call__(self, state, traj):
        return traj.reward, {}


def running_var(var: jax.Array, r: jax.Array, momentum: float, axis_name: str | None = None) -> jax.Array:
    """An exponential moving average of the variance of ``r`` (this batch's, merged across ``axis_name``)."""
    batch = jnp.mean(jnp.square(r - r.mean()))
    if axis_name is not None:
        batch = jax.lax.pmean(batch, axis_name)
    return momentum * var + (1 - momentum) * batch


class ScaledSum:
    """``r = ext_coef * r_ext + int_coef * normalise(r_int)`` around any intrinsic transform.

    ``intrinsic`` is itself a :class:`RewardTransform` (a reward model); its output is divided by a running
    std of its values when ``normalize`` is set. Extrinsic and intrinsic per-step means are logged separately.
    """

    def __init__(self, intrinsic: RewardTransform, ext_coef: float = 1.0, int_coef: float = 1.0,
                 normalize: bool = True, momentum: float = 0.99):
        self.intrinsic, self.ext_coef, self.int_coef = intrinsic, ext_coef, int_coef
        self.normalize, self.momentum = normalize, momentum

    def init(self, key, spec):
        return {"model": self.intrinsic.init(key, spec), "var": jnp.float32(1.0)}

    def resizable(self, path: str) -> bool:
        """Whether a state array at ``path`` may change shape during a run (the intrinsic transform's say)."""
        return bool(getattr(self.intrinsic, "resizable", lambda p: False)(path))

    def update(self, state, traj, key, axis_name=None):
        model, metrics = self.intrinsic.update(state["model"], traj, key, axis_name)
        r_int, _ = self.intrinsic(model, traj)
        return {"model": model, "var": running_var(state["var"], r_int, self.momentum, axis_name)}, metrics

    def __call__(self, state, traj):
        r_int, metrics = self.intrinsic(state["model"], traj)
        return self._combine(state, traj, r_int, metrics)

    def update_and_reward(self, state, traj, key, axis_name=None):
        model, r_int, metrics = update_and_reward(self.intrinsic, state["model"], traj, key, axis_name)
        state = {"model": model, "var": running_var(state["var"], r_int, self.momentum, axis_name)}
        reward, metrics = self._combine(state, traj, r_int, metrics)
        return state, reward, metrics

    def _combine(self, state, traj, r_int, metrics):
        if self.normalize:
            r_int = r_int / jnp.sqrt(state["var"] + 1e-8)
        reward = self.ext_coef * traj.reward + self.int_coef * r_int
        return reward, {**metrics, "reward/extrinsic": traj.reward.mean(), "reward/intrinsic": r_int.mean()}
