"""E3B: Exploration via Elliptical Episodic Bonuses (Henaff et al., 2022) as a reward transform.

An embedding ``phi`` of observations is trained by inverse dynamics (predict ``a[t]`` from ``phi(s[t])`` and
``phi(s[t+1])``), so it keeps what the agent controls and drops distractors. Within an episode, each env keeps the
inverse of ``C = lambda * I + sum of phi phi^T`` over the episode's states so far; the bonus of a step is

    b[t] = phi(s[t+1])^T C^-1 phi(s[t+1])      and then      C^-1 <- C^-1 - (C^-1 phi)(C^-1 phi)^T / (1 + b[t])

(a rank-one Sherman-Morrison update: no inverse is ever computed). ``C^-1`` is reset to ``I / lambda`` where an
episode starts, so the bonus is high for states unlike those of the same episode.

The per-env ``C^-1`` (``[num_envs, d, d]``) and the last step's done flags live in the transform's state, carried
across rollouts (an episode spans rollouts), checkpointed and vmapped like the rest; ``num_envs`` is the number of
envs this transform sees per call (per device under data parallelism). The seam calls ``update`` (train the
embedding, advance ``C^-1`` through the rollout) then ``__call__`` (the bonus of the rollout, from the ``C^-1`` at
its start, with the updated embedding).

Array, image and dict observations are flattened per step (``rnd.flat_obs``) and, with ``normalize_obs`` (default),
standardised by running statistics and clipped to [-5, 5] as RND's are (raw NetHack glyph ids are in the thousands:
unnormalised, the bonus reached 1e7 and the policy's parameters NaN on MiniHack). Discrete actions: the inverse model
classifies the action taken (cross-entropy, as the paper); continuous actions (e.g. HERON's factor envs): it
regresses the action vector (mean squared error).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxrl_pref.networks import MLP
from jaxrl_pref.rewards.rnd import flat_obs, normalise_obs, obs_layout, obs_stats, update_obs_stats


class _InverseDynamics(nn.Module):
    hidden: Sequence[int]
    features: int
    num_actions: int

    def setup(self):
        self.embed = nn.Sequential([MLP(tuple(self.hidden), "relu"), nn.Dense(self.features)])
        self.head = nn.Sequential([MLP((tuple(self.hidden)[-1],), "relu"), nn.Dense(self.num_actions)])

    def __call__(self, x, x_next):
        return self.head(jnp.concatenate([self.embed(x), self.embed(x_next)], -1))

    def phi(self, x):
        return self.embed(x)


class E3B:
    """E3B bonus (see module doc). Use ``ScaledSum(E3B(num_envs), int_coef=c)`` (ScaledSum normalises the bonus by
    its running std)."""

    def __init__(self, num_envs: int, hidden: Sequence[int] = (64, 64), features: int = 32, ridge: float = 0.1,
                 learning_rate: float = 3e-4, steps: int = 1, normalize_obs: bool = True):
        if ridge <= 0:
            raise ValueError(f"E3B: ridge (lambda) must be positive, got {ridge}")
        self.num_envs, self.hidden, self.features, self.ridge = num_envs, tuple(hidden), features, ridge
        self.tx = optax.adam(learning_rate)
        self.steps, self.normalize_obs = steps, normalize_obs

    def init(self, key, spec) -> dict:
        self._discrete = spec.discrete
        self._rank, dim = obs_layout(spec)
        self.net = _InverseDynamics(self.hidden, self.features, spec.num_actions)
        x = jnp.zeros((1, dim))
        params = self.net.init(key, x, x)
        eye = jnp.broadcast_to(jnp.eye(self.features) / self.ridge, (self.num_envs, self.features, self.features))
        return {"params": params, "opt": self.tx.init(params), "cinv": eye, "cinv_start": eye,
                "last_done": jnp.ones(self.num_envs, bool), "last_done_start": jnp.ones(self.num_envs, bool),
                **obs_stats(dim)}

    def _x(self, state, obs):
        x = flat_obs(obs, self._rank)
        return normalise_obs(state, x) if self.normalize_obs else x

    def _phi(self, params, obs, state):
        """The embedding of ``obs`` (normalised by ``state``'s running statistics when ``normalize_obs``)."""
        return self.net.apply(params, self._x(state, obs), method=_InverseDynamics.phi)

    def _bonus(self, state, params, cinv, last_done, traj):
        """Scans the rollout: returns ``(bonus [T, N], C^-1 after it)``."""
        phi = self._phi(params, traj.final_obs, state)  # [T, N, d]: the state each step led to
        starts = jnp.concatenate([last_done[None], traj.done[:-1]], 0)  # an episode starts at step t
        reset = jnp.eye(self.features) / self.ridge

        def step(cinv, inp):
            f, start = inp
            cinv = jnp.where(start[:, None, None], reset, cinv)
            u = jnp.einsum("nij,nj->ni", cinv, f)
            b = jnp.maximum(jnp.einsum("ni,ni->n", f, u), 0.0)  # >= 0 for a positive-definite C^-1 (float guard)
            cinv = cinv - jnp.einsum("ni,nj->nij", u, u) / (1.0 + b)[:, None, None]
            return cinv, b

        cinv, bonus = jax.lax.scan(step, cinv, (phi, starts))
        return bonus, cinv

    def update(self, state, traj, key, axis_name: Optional[str] = None):
        new, _, metrics = self._update(state, traj, axis_name)
        return new, metrics

    def update_and_reward(self, state, traj, key, axis_name: Optional[str] = None):
        """``update`` then ``__call__`` with one scan: the update's scan of the rollout (from the ``C^-1`` at its
        start, with the updated embedding) is the bonus ``__call__`` computes."""
        new, bonus, metrics = self._update(state, traj, axis_name)
        return new, bonus, {**metrics, "e3b/bonus": bonus.mean()}

    def _update(self, state, traj, axis_name):
        T, N = traj.action.shape[:2]
        if N != self.num_envs:
            raise ValueError(f"E3B(num_envs={self.num_envs}) got a rollout of {N} envs: pass the env count it sees "
                             "(per device under data parallelism)")
        if self.normalize_obs:  # raw NetHack glyph ids are in the thousands: standardise, as RND does
            raw = flat_obs(traj.final_obs, self._rank)
            state = update_obs_stats(state, raw.reshape((-1, raw.shape[-1])), axis_name)
        x, x_next = self._x(state, traj.obs), self._x(state, traj.final_obs)
        x, x_next = x.reshape((T * N, -1)), x_next.reshape((T * N, -1))
        actions = traj.action.reshape((T * N,) + traj.action.shape[2:])

        def loss(p):
            out = self.net.apply(p, x, x_next)
            if self._discrete:  # classify the action taken
                return optax.softmax_cross_entropy_with_integer_labels(out, actions).mean(), \
                    (jnp.argmax(out, -1) == actions).mean()
            err = jnp.square(out - actions.reshape(out.shape)).mean()  # regress the (clipped) action vector
            return err, -err

        def step(carry, _):
            p, opt = carry
            (value, acc), grads = jax.value_and_grad(loss, has_aux=True)(p)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            updates, opt = self.tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), (value, acc)

        (params, opt), (losses, accs) = jax.lax.scan(step, (state["params"], state["opt"]), None,
                                                     length=self.steps)
        bonus, cinv = self._bonus(state, params, state["cinv"], state["last_done"], traj)
        new = {**state, "params": params, "opt": opt, "cinv": cinv, "cinv_start": state["cinv"],
               "last_done": traj.done[-1], "last_done_start": state["last_done"]}
        metrics = {"e3b/inverse_loss": losses[-1]}
        if self._discrete:
            metrics["e3b/inverse_accuracy"] = accs[-1]
        return new, bonus, metrics

    def __call__(self, state, traj):
        bonus, _ = self._bonus(state, state["params"], state["cinv_start"], state["last_done_start"], traj)
        return bonus, {"e3b/bonus": bonus.mean()}
