"""Advantage estimation and policy-gradient losses (time-major arrays ``[T, ...]``), fitted-Q targets, and the
Bradley-Terry loss of the preference reward models."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards, values, next_values, terminated, done, gamma, lam):
    """Generalised advantage estimation with separate termination and episode-end flags.

    Args:
      rewards, values: ``[T, ...]`` reward r_t and value V(s_t).
      next_values: ``[T, ...]`` value of the true next observation s'_t (for a truncated step the value of the
        final observation, not of the reset observation that follows it).
      terminated: ``[T, ...]`` True where s'_t is terminal: no bootstrapping from it.
      done: ``[T, ...]`` True where the episode ended (terminated or truncated): the advantage recursion stops.
    Returns:
      (advantages, returns) each ``[T, ...]``; returns = advantages + values (the value-function targets).
    """
    not_term = 1.0 - terminated.astype(jnp.float32)
    not_done = 1.0 - done.astype(jnp.float32)
    deltas = rewards + gamma * not_term * next_values - values
    decay = gamma * lam * not_done

    def step(carry, x):
        delta, d = x
        adv = delta + d * carry
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros_like(deltas[0]), (deltas, decay), reverse=True)
    return adv, adv + values


def ppo_loss(new_log_prob, old_log_prob, advantages, entropy, new_value, old_value, returns, *, clip_eps,
             vf_coef, ent_coef, clip_value: bool = True, normalize_advantages: bool = True):
    """PPO clipped-surrogate loss. Returns (total, metrics dict).

    Several value heads (one per reward stream): ``new_value``, ``old_value`` and ``returns`` carry a trailing
    stream axis that ``advantages`` (already summed over streams) does not; the heads' value losses add (and are
    returned per head as ``loss/value_heads`` ``[K]``)."""
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = new_log_prob - old_log_prob
    ratio = jnp.exp(log_ratio)
    pg_loss = -jnp.minimum(ratio * advantages,
                           jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages).mean()
    v_err = jnp.square(new_value - returns)
    if clip_value:
        v_clipped = old_value + jnp.clip(new_value - old_value, -clip_eps, clip_eps)
        v_err = jnp.maximum(v_err, jnp.square(v_clipped - returns))
    heads = {}
    if v_err.ndim > advantages.ndim:
        heads = {"loss/value_heads": 0.5 * v_err.reshape(-1, v_err.shape[-1]).mean(0)}
        v_err = v_err.sum(-1)
    v_loss = 0.5 * v_err.mean()
    ent = entropy.mean()
    total = pg_loss + vf_coef * v_loss - ent_coef * ent
    metrics = {
        "loss/policy": pg_loss,
        "loss/value": v_loss,
        "loss/entropy": ent,
        "loss/approx_kl": ((ratio - 1.0) - log_ratio).mean(),
        "loss/clip_frac": (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32).mean(),
        **heads,
    }
    return total, metrics


# -- fitted-Q regression targets (SQIRL) --------------------------------------------------------------------------

def discounted_returns(rewards, terminal, gamma):
    """Monte-Carlo returns ``G_t = r_t + gamma * (1 - terminal_t) * G_{t+1}`` of time-major ``[T, ...]`` rewards.

    ``terminal`` marks the last step of each episode (terminated, truncated, or the end of a finite horizon): the
    return restarts there. The step after ``T - 1`` counts as terminal.
    """
    cont = 1.0 - terminal.astype(jnp.float32)

    def step(g, x):
        r, c = x
        g = r + gamma * c * g
        return g, g

    _, ret = jax.lax.scan(step, jnp.zeros_like(rewards[0], jnp.float32), (rewards.astype(jnp.float32), cont),
                          reverse=True)
    return ret


def fitted_q_targets(mc_return, reward, terminal, next_q, gamma):
    """Regression targets for a stack of Q-functions ``Q_1..Q_k`` (SQIRL's k heads; fitted-Q iteration).

    Args:
      mc_return: ``[B]`` Monte-Carlo return of the random continuation (target of ``Q_1``, i.e. ``Q^random``).
      reward, terminal: ``[B]`` one-step reward and whether the next state ends the episode (no bootstrapping).
      next_q: ``[k, B, A]`` the heads' values at the next observation (treated as constants).
    Returns:
      ``[k, B]``: row 0 is ``mc_return``; row ``j > 0`` is ``r + gamma * (1 - terminal) * max_a next_q[j-1, :, a]``
      (one Bellman-optimality backup of the previous head).
    """
    next_q = jax.lax.stop_gradient(next_q)
    cont = 1.0 - terminal.astype(jnp.float32)
    backups = reward[None] + gamma * cont[None] * next_q[:-1].max(axis=-1)
    return jnp.concatenate([mc_return[None].astype(jnp.float32), backups], axis=0)


def huber(x, delta: float = 1.0):
    """Huber (smooth-L1) loss of the error ``x``: ``x^2/2`` for ``|x| <= delta``, linear beyond."""
    a = jnp.abs(x)
    return jnp.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


# -- preferences (HERON, ONI-Ranking, Motif) ---------------------------------------------------------------------

def bradley_terry_nll(d, pref):
    """Bradley-Terry negative log-likelihood per pair, of score differences ``d = s(a) - s(b)`` under soft labels
    ``pref`` = P(a preferred over b) (1, 0, or 1/2 for a tie): ``-[p log sigmoid(d) + (1 - p) log sigmoid(-d)]``."""
    return -(pref * jax.nn.log_sigmoid(d) + (1 - pref) * jax.nn.log_sigmoid(-d))


def bradley_terry_loss(d, pref, weights):
    """:func:`bradley_terry_nll`'s ``weights``-weighted mean over pairs, ``sum w nll / max(sum w, 1)`` (weight 0
    leaves a pair out)."""
    return (bradley_terry_nll(d, pref) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def rpo_penalty(r_policy, w_policy, r_ref, w_ref):
    """RPO's reward penalty (Liu et al., 2024: the adversarial term of its min-max objective), the reward model's
    mean reward under the current policy's data minus its mean under the reference data, each
    ``weights``-weighted: ``sum w_p r_p / sum w_p - sum w_r r_r / sum w_r`` (a side with no weight counts 0).
    Added to the reward model's likelihood loss with a coefficient, it lowers the reward of what the policy does
    more often than the reference data shows, as far as the labels let it."""
    def wmean(r, w):
        return (r * w).sum() / jnp.maximum(w.sum(), 1e-8)
    return wmean(r_policy, w_policy) - wmean(r_ref, w_ref)
