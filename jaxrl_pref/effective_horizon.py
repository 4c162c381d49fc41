"""Effective-horizon tools for small deterministic JAX tasks (Laidlaw et al., "Bridging RL theory and practice with
the effective horizon" / "The effective horizon explains deep RL performance in stochastic environments").

For a task whose dynamics are deterministic and whose reachable finite-horizon state space is small, this module
enumerates the MDP exactly (breadth-first over ``(timestep, state)``, stepping the JAX env itself in batches),
computes by dynamic programming

* ``Q^rand`` (the uniformly random policy's Q-function) and ``k - 1`` Bellman-optimality backups of it,
  ``Q_k = T^{k-1} Q^rand`` -- exactly what SQIRL's k heads estimate from random rollouts -- and ``Q*``;
* ``k*``: the smallest k for which acting greedily on ``Q_k`` is optimal at every state on the optimal policy's
  trajectories (the paper's "k-QVI-solvable" depth; with exact Q-values SQIRL with ``planning_depth >= k*`` is
  optimal);
* a documented sample-complexity proxy of the effective horizon, ``H_hat = min_k (k + log_A m_k)`` with
  ``m_k = ceil(2 (R / gap_k)^2 ln(2 A))`` -- Hoeffding's count of random rollouts per (state, action) that estimate
  ``Q^rand`` to within ``gap_k / 2`` (then the greedy choice on ``Q_k`` is still right); ``gap_k`` is the smallest
  margin, over the optimal-trajectory states, between the best optimal action's ``Q_k`` and the best non-optimal
  action's, and ``R`` the range of returns (``max Q* - min Q^rand``). This is a proxy, not the paper's exact
  bound (which uses the range of the k-step value and a union bound over states).

States are identified by their observation together with the timestep, so tasks must have observations that
determine the state (true for DeepSea, KeyDoor and the classic gridworlds; not for envs with hidden state).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import envs


@dataclasses.dataclass
class TabularMDP:
    """Finite-horizon deterministic MDP by levels: level ``t`` has ``n_t`` states; ``next[t]`` ``[n_t, A]`` indexes
    level ``t+1`` (-1: the episode ends), ``reward[t]`` ``[n_t, A]``; ``start`` indexes level 0."""
    reward: list
    next: list
    start: np.ndarray
    num_actions: int

    @property
    def num_states(self) -> int:
        return sum(len(r) for r in self.reward)


class NotTabular(ValueError):
    """The task is stochastic or too large to enumerate."""


def enumerate_mdp(name: str, horizon: Optional[int] = None, max_states: int = 200_000, num_resets: int = 256,
                  seed: int = 0, **env_kwargs) -> TabularMDP:
    """Enumerates the reachable ``(t, state)`` pairs of JAX task ``name`` up to ``horizon`` (default: its time
    limit). Raises :class:`NotTabular` if a transition depends on the step key or the states exceed ``max_states``."""
    env, params = envs._base(name, env_kwargs)  # the unwrapped task (step_env/reset_env)
    A = int(env.action_space(params).n)
    H = int(horizon or params.max_steps_in_episode)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_resets)
    obs0, st0 = jax.jit(jax.vmap(env.reset_env, in_axes=(0, None)))(keys, params)

    def step_all(states, key):  # every state x every action, with one key (and a second key to test determinism)
        n = jax.tree.leaves(states)[0].shape[0]
        s = jax.tree.map(lambda x: jnp.repeat(x, A, axis=0), states)
        a = jnp.tile(jnp.arange(A), n)
        f = jax.vmap(env.step_env, in_axes=(None, 0, 0, None))
        o1, s1, r1, d1, _ = f(key, s, a, params)
        o2, _, r2, d2, _ = f(jax.random.fold_in(key, 1), s, a, params)
        same = jnp.all((o1 == o2).reshape(o1.shape[0], -1), axis=1) & (r1 == r2) & (d1 == d2)
        return o1, s1, r1, d1, same

    step_all = jax.jit(step_all)

    def dedupe(obs, states):
        o = np.asarray(obs).reshape(obs.shape[0], -1)
        _, first, inverse = np.unique(o, axis=0, return_index=True, return_inverse=True)
        return jax.tree.map(lambda x: x[first], states), inverse.reshape(-1)

    level, start = dedupe(obs0, st0)
    rewards, nexts = [], []
    for t in range(H):
        n = jax.tree.leaves(level)[0].shape[0]
        o, s, r, d, same = step_all(level, jax.random.PRNGKey(t))
        if not bool(np.asarray(same).all()):
            raise NotTabular(f"{name}: transitions depend on the random key (stochastic); no exact enumeration")
        done = np.asarray(d, bool) | (t == H - 1)
        keep = np.flatnonzero(~done)
        nxt = np.full(n * A, -1)
        if keep.size:
            sub = jax.tree.map(lambda x: x[keep], s)
            level_next, inv = dedupe(o[keep], sub)
            nxt[keep] = inv
        else:
            level_next = None
        rewards.append(np.asarray(r, np.float64).reshape(n, A))
        nexts.append(nxt.reshape(n, A))
        if sum(len(x) for x in rewards) > max_states:
            raise NotTabular(f"{name}: more than {max_states} reachable (timestep, state) pairs")
        if level_next is None:
            break
        level = level_next
    return TabularMDP(rewards, nexts, np.unique(start), A)


def _backup(mdp: TabularMDP, gamma: float, value_of_next) -> list:
    """Q[t] = r + gamma * V_next[next] (0 where the episode ends), with V_next = value_of_next(Q[t+1])."""
    q = [None] * len(mdp.reward)
    for t in reversed(range(len(mdp.reward))):
        nxt = mdp.next[t]
        v = value_of_next(q[t + 1]) if t + 1 < len(q) else np.zeros(1)
        q[t] = mdp.reward[t] + gamma * np.where(nxt >= 0, v[np.maximum(nxt, 0)], 0.0)
    return q


def q_heads(mdp: TabularMDP, gamma: float, k: int) -> list:
    """``[Q_1, ..., Q_k]``: Q_1 = Q^rand, Q_j = one optimality backup of Q_{j-1} (each a list over levels)."""
    heads = [_backup(mdp, gamma, lambda q: q.mean(axis=1))]
    for _ in range(k - 1):
        prev = heads[-1]
        heads.append([mdp.reward[t] + gamma * np.where(mdp.next[t] >= 0,
                                                       (prev[t + 1].max(axis=1) if t + 1 < len(prev) else
                                                        np.zeros(1))[np.maximum(mdp.next[t], 0)], 0.0)
                      for t in range(len(prev))])
    return heads


def q_star(mdp: TabularMDP, gamma: float) -> list:
    return _backup(mdp, gamma, lambda q: q.max(axis=1))


def optimal_path_states(mdp: TabularMDP, qs: list, tol: float = 1e-9) -> list:
    """Per level, the states reached from the start states by following any optimal action."""
    on = [np.zeros(len(r), bool) for r in mdp.reward]
    on[0][mdp.start] = True
    for t in range(len(mdp.reward) - 1):
        opt = qs[t] >= qs[t].max(axis=1, keepdims=True) - tol
        nxt = mdp.next[t][on[t][:, None] & opt & (mdp.next[t] >= 0)]
        on[t + 1][nxt] = True
    return on


@dataclasses.dataclass
class HorizonReport:
    task: str
    horizon: int
    num_states: int
    num_actions: int
    k_star: Optional[int]           # smallest k whose greedy policy is optimal on the optimal trajectories
    gaps: list                      # gap_k for k = 1..max_k (<= 0: greedy on Q_k errs somewhere)
    h_hat: float                    # min_k (k + log_A m_k)
    optimal_return: float
    random_return: float


def analyse(name: str, gamma: float = 1.0, max_k: Optional[int] = None, **kwargs) -> HorizonReport:
    """Exact ``k*``, per-k gaps and the ``H_hat`` proxy for a deterministic tabular JAX task (see module doc)."""
    mdp = enumerate_mdp(name, **kwargs)
    H = len(mdp.reward)
    max_k = max_k or H
    qs = q_star(mdp, gamma)
    heads = q_heads(mdp, gamma, max_k)
    on = optimal_path_states(mdp, qs)
    R = max(float(q.max()) for q in qs) - min(float(q.min()) for q in heads[0])
    R = R if R > 0 else 1.0
    A = mdp.num_actions
    k_star, gaps, h_hat = None, [], math.inf
    for k, head in enumerate(heads, start=1):
        ok, gap = True, math.inf
        for t in range(H):
            if not on[t].any():
                continue
            q, h = qs[t][on[t]], head[t][on[t]]
            opt = q >= q.max(axis=1, keepdims=True) - 1e-9
            chosen = np.argmax(h, axis=1)
            ok &= bool(opt[np.arange(len(h)), chosen].all())
            best_opt = np.where(opt, h, -np.inf).max(axis=1)
            best_bad = np.where(~opt, h, -np.inf).max(axis=1)
            g = best_opt - best_bad
            g = g[np.isfinite(g)]
            if g.size:
                gap = min(gap, float(g.min()))
        gaps.append(gap)
        if ok and k_star is None:
            k_star = k
        if gap > 0:
            m = math.ceil(2 * (R / gap) ** 2 * math.log(2 * A)) if math.isfinite(gap) else 1
            h_hat = min(h_hat, k + math.log(m, A))
    v_rand = heads[0][0].mean(axis=1)[mdp.start].mean()
    return HorizonReport(name, H, mdp.num_states, A, k_star, gaps, h_hat, float(qs[0].max(axis=1)[mdp.start].mean()),
                         float(v_rand))
