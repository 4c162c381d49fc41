"""RND as a reward transform (issue 20): novelty, observation statistics, dict observations, the seam in PPO."""
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
from jaxrl_pref.rewards.rnd import RND


def spec(shape):
    return envs.EnvSpec(shape, True, 2)


def batch(x):
    return SimpleNamespace(final_obs=x, reward=jnp.zeros(x.shape[:2] if not isinstance(x, dict) else
                                                         next(iter(x.values())).shape[:2]))


def test_seen_observations_pay_less_than_new_ones():
    """Trained on rollouts whose next observations come from one region, the predictor matches the target there:
    the bonus of those observations falls, and observations from elsewhere pay clearly more."""
    rnd = RND(hidden=(32, 32), features=16, learning_rate=1e-3, steps=4)
    state = rnd.init(jax.random.PRNGKey(0), spec((6,)))
    key = jax.random.PRNGKey(1)
    seen = jax.random.normal(key, (16, 8, 6)) * 0.3 + 1.0           # [T, N, 6] around +1
    novel = jax.random.normal(jax.random.PRNGKey(2), (16, 8, 6)) * 0.3 - 1.0  # around -1
    update = jax.jit(lambda s, x, k: rnd.update(s, batch(x), k))
    state, _ = update(state, seen, key)
    first, _ = rnd(state, batch(seen))
    for i in range(60):
        state, metrics = update(state, seen, jax.random.fold_in(key, i))
    after, m = rnd(state, batch(seen))
    new, _ = rnd(state, batch(novel))
    chex.assert_shape(after, (16, 8))
    chex.assert_type(after, jnp.float32)
    assert float(after.mean()) < 0.3 * float(first.mean()), (after.mean(), first.mean())
    assert float(new.mean()) > 5 * float(after.mean()), (new.mean(), after.mean())
    assert np.isfinite(float(metrics["rnd/loss"])) and "rnd/bonus" in m


def test_observation_statistics_are_those_of_every_observation_seen():
    rnd = RND(hidden=(8,), features=4)
    state = rnd.init(jax.random.PRNGKey(0), spec((3,)))
    xs = [jax.random.normal(jax.random.PRNGKey(i), (5, 4, 3)) * (i + 1) + i for i in range(3)]
    for i, x in enumerate(xs):
        state, _ = rnd.update(state, batch(x), jax.random.PRNGKey(10 + i))
    allx = np.concatenate([np.asarray(x).reshape(-1, 3) for x in xs])
    np.testing.assert_allclose(state["obs_mean"], allx.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state["obs_var"], allx.var(0), rtol=1e-3, atol=1e-3)


def test_dict_and_image_observations_are_flattened_per_step():
    rnd = RND(hidden=(8,), features=4)
    state = rnd.init(jax.random.PRNGKey(0), spec({"glyphs": (3, 3), "blstats": (5,)}))
    obs = {"glyphs": jnp.ones((4, 2, 3, 3), jnp.int16), "blstats": jnp.arange(40, dtype=jnp.int32).reshape(4, 2, 5)}
    state, _ = rnd.update(state, batch(obs), jax.random.PRNGKey(1))
    r, _ = rnd(state, batch(obs))
    chex.assert_shape(r, (4, 2))
    chex.assert_shape(state["obs_mean"], (14,))
    img = RND(hidden=(8,), features=4)
    s2 = img.init(jax.random.PRNGKey(0), spec((5, 5, 2)))
    s2, _ = img.update(s2, batch(jnp.ones((3, 2, 5, 5, 2))), jax.random.PRNGKey(1))
    chex.assert_shape(img(s2, batch(jnp.ones((3, 2, 5, 5, 2))))[0], (3, 2))


@pytest.mark.slow
def test_ppo_with_rnd_through_the_seam_vmaps_over_seeds():
    """PPO + RND on DeepSea-8 (sparse): the bonus state is threaded through every update inside one jit, vmapped
    over 2 seeds, and the logged bonus, loss and intrinsic reward are finite and differ between seeds."""
    cfg = ppo.Config(env_name="DeepSea-8", num_envs=8, num_steps=16, total_timesteps=8 * 16 * 6, hidden=(16,))
    reward = ScaledSum(RND(hidden=(16,), features=8), ext_coef=1.0, int_coef=0.5, normalize=False)
    out = jax.jit(jax.vmap(ppo.make_train(cfg, reward=reward)))(jax.random.split(jax.random.PRNGKey(0), 2))
    m = out.metrics
    chex.assert_shape(m["rnd/bonus"], (2, cfg.num_updates))
    for k in ("rnd/bonus", "rnd/loss", "reward/intrinsic"):
        assert np.isfinite(np.asarray(m[k])).all(), k
    assert float(np.asarray(m["rnd/bonus"]).min()) > 0
    assert not np.allclose(m["rnd/loss"][0], m["rnd/loss"][1])
    assert (np.asarray(m["reward/intrinsic"]) > 0).all()  # the bonus reaches the learning reward
