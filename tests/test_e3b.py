"""E3B as a reward transform (issue 20): the elliptical bonus against explicit inverses, episode resets across
rollouts, the inverse-dynamics embedding, the seam in PPO."""
from __future__ import annotations

from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from agents import ppo
from jaxrl_pref.rewards import ScaledSum
from jaxrl_pref.rewards.e3b import E3B
from jaxrl_pref.testing import as_transition, e3b_inverse_accuracies, e3b_rollout


def reference_bonus(phi, done_prev, dones, ridge):
    """Explicit C = ridge I + sum phi phi^T per episode, inverted at every step (numpy, float64)."""
    T, N, d = phi.shape
    out = np.zeros((T, N))
    for n in range(N):
        C = None
        for t in range(T):
            start = done_prev[n] if t == 0 else dones[t - 1, n]
            if start or C is None:
                C = ridge * np.eye(d)
            f = phi[t, n].astype(np.float64)
            out[t, n] = f @ np.linalg.inv(C) @ f
            C = C + np.outer(f, f)
    return out


def test_bonus_equals_explicit_inverses_with_resets_across_rollouts():
    T, N, dim = 6, 3, 5
    e3b = E3B(num_envs=N, hidden=(16,), features=4, ridge=0.5, learning_rate=0.0,  # lr 0: a fixed embedding
              normalize_obs=False)
    state = e3b.init(jax.random.PRNGKey(0), envs.EnvSpec((dim,), True, 4))
    done1 = np.zeros((T, N), bool)
    done1[2, 0] = done1[4, 1] = done1[T - 1, 2] = True   # env 2's episode ends at the rollout's last step
    done2 = np.zeros((T, N), bool)
    done2[1, 1] = True
    r1 = e3b_rollout(jax.random.PRNGKey(1), T, N, dim, 4, done1)
    r2 = e3b_rollout(jax.random.PRNGKey(2), T, N, dim, 4, done2)
    phi = lambda o: np.asarray(e3b._phi(state["params"], o, state))  # noqa: E731
    ref = reference_bonus(np.concatenate([phi(r1.final_obs), phi(r2.final_obs)]), np.ones(N, bool),
                          np.concatenate([done1, done2]), 0.5)
    got = []
    for r in (r1, r2):
        state, m = e3b.update(state, r, jax.random.PRNGKey(0))
        b, _ = e3b(state, r)
        chex.assert_shape(b, (T, N))
        got.append(np.asarray(b))
    np.testing.assert_allclose(np.concatenate(got), ref, rtol=2e-3, atol=1e-5)
    assert np.isfinite(float(m["e3b/inverse_loss"]))


def test_repeating_a_state_pays_less_and_a_new_episode_pays_again():
    T, N, dim = 8, 2, 4
    # one constant observation: standardised it would be all zeros (no embedding), so raw inputs here
    e3b = E3B(num_envs=N, hidden=(8,), features=4, ridge=0.1, learning_rate=0.0, normalize_obs=False)
    state = e3b.init(jax.random.PRNGKey(0), envs.EnvSpec((dim,), True, 2))
    obs = jnp.ones((T, N, dim))
    done = np.zeros((T, N), bool)
    done[3, 1] = True  # env 1 starts a new episode at step 4
    tr = SimpleNamespace(obs=obs, final_obs=obs, action=jnp.zeros((T, N), jnp.int32), done=jnp.asarray(done),
                         reward=jnp.zeros((T, N)))
    state, _ = e3b.update(state, tr, jax.random.PRNGKey(0))
    b = np.asarray(e3b(state, tr)[0])
    assert (np.diff(b[:, 0]) < 0).all()                      # the same state again and again: less each time
    np.testing.assert_allclose(b[4, 1], b[0, 1], rtol=1e-5)  # reset at the episode start
    assert b[7, 0] < 0.2 * b[0, 0]


def test_inverse_dynamics_embedding_learns_the_action():
    """The next state shows the action taken: the inverse model's accuracy climbs well above chance (1/4). 8 seeds
    in one vmapped program (init, data and update keys from ``split(PRNGKey(0), 8)``), checked on their medians.
    Measured (``python -m benchmarks.learning_spread --task e3b_inverse --set-size 64 --sets 2`` and ``--set-size 8
    --first-set 0``, 2026-12-07, 136 seeds, 2-core CPU): accuracy after the first update (4 Adam steps)
    0.451 +- 0.108 per seed (0.18 ... 0.73: 15 of 136 seeds at >= 0.6, so the old one-seed bound < 0.6 failed on
    ~11% of seeds; median of 8: 0.35 ... 0.53), after the 40th 1.0 on all 136. Bounds: median first < 0.7 (1 seed of
    136 above), median last > 0.9; another machine (other seeds standing in) fails them w.p. < 3e-6 and 2e-7
    (``--summary --task e3b_inverse``: binomial at the per-seed miss rates (misses + 1) / 138)."""
    accs = e3b_inverse_accuracies(jax.random.split(jax.random.PRNGKey(0), 8))  # [seed, update]
    assert np.median(accs[:, -1]) > 0.9 and np.median(accs[:, 0]) < 0.7, accs[:, [0, -1]]


@pytest.mark.slow
def test_ppo_with_e3b_through_the_seam_vmaps_over_seeds():
    cfg = ppo.Config(env_name="KeyDoor-5", num_envs=8, num_steps=16, total_timesteps=8 * 16 * 6, hidden=(16,))
    reward = ScaledSum(E3B(num_envs=8, hidden=(16,), features=8), ext_coef=1.0, int_coef=0.1)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    out = jax.jit(jax.vmap(ppo.make_train(cfg, reward=reward)))(keys)
    start = jax.jit(jax.vmap(ppo.make_trainer(cfg, reward=reward).init))(keys).reward_state["model"]
    m = out.metrics
    chex.assert_shape(m["e3b/bonus"], (2, cfg.num_updates))
    for k in ("e3b/bonus", "e3b/inverse_loss", "reward/intrinsic"):
        assert np.isfinite(np.asarray(m[k])).all(), k
    assert (np.asarray(m["e3b/bonus"]) > 0).all()
    assert (np.asarray(m["reward/intrinsic"]) > 0).all()  # the bonus reaches the reward PPO learns from
    # E3B's state is threaded through all 6 updates of each seed (not reset, not dropped): its observation
    # statistics count every next observation of every rollout, its inverse-dynamics model took its Adam steps (every
    # weight moved, per seed), and the two seeds' models differ
    end = out.runner_state.reward_state["model"]
    np.testing.assert_allclose(end["obs_count"], 1e-4 + cfg.num_updates * cfg.num_envs * cfg.num_steps, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(end["params"])):
        assert all(not np.array_equal(np.asarray(a)[s], np.asarray(b)[s]) for s in range(2))
    assert any(not np.array_equal(np.asarray(x)[0], np.asarray(x)[1]) for x in jax.tree.leaves(end["params"]))


def test_observation_scale_does_not_matter():
    """With running observation statistics (the default) the bonus of observations scaled by 1000 (raw glyph ids are
    in the thousands) is that of the unscaled ones: finite and of the same size."""
    T, N, dim = 8, 4, 5
    spec = envs.EnvSpec((dim,), True, 4)
    tr = as_transition(e3b_rollout(jax.random.PRNGKey(1), T, N, dim, 4, np.zeros((T, N), bool)))
    big = tr.replace(obs=tr.obs * 1000.0 + 3000.0, final_obs=tr.final_obs * 1000.0 + 3000.0)
    out = []
    for t in (tr, big):
        e3b = E3B(num_envs=N, hidden=(16,), features=8, learning_rate=0.0)
        state, _ = e3b.update(e3b.init(jax.random.PRNGKey(0), spec), t, jax.random.PRNGKey(2))
        out.append(np.asarray(e3b(state, t)[0]))
    assert np.isfinite(out[1]).all()
    np.testing.assert_allclose(out[1], out[0], rtol=0.05, atol=1e-3)
