"""Network initialisation: the QR-free orthogonal initialiser, and no LAPACK calls in vmapped training."""
import jax
import numpy as np
import pytest

from agents import ppo
from jaxrl_pref.networks import orthogonal


@pytest.mark.parametrize("shape", [(4, 64), (64, 64), (64, 2), (3, 3, 8, 16)])
def test_orthogonal_init_is_orthogonal_and_scaled(shape):
    w = np.asarray(orthogonal(2.0)(jax.random.PRNGKey(0), shape))
    assert w.shape == shape and w.dtype == np.float32
    m = w.reshape(-1, shape[-1]) / 2.0
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    np.testing.assert_allclose(gram, np.eye(len(gram)), atol=2e-6)
    # different keys, different matrices; same key, same matrix
    assert not np.allclose(w, orthogonal(2.0)(jax.random.PRNGKey(1), shape))
    np.testing.assert_array_equal(w, orthogonal(2.0)(jax.random.PRNGKey(0), shape))


def test_orthogonal_init_is_haar_like():
    """Entries of a Haar-random n x n orthogonal matrix have mean 0 and variance 1/n."""
    ws = jax.vmap(lambda k: orthogonal()(k, (16, 16)))(jax.random.split(jax.random.PRNGKey(0), 400))
    x = np.asarray(ws).ravel()
    assert abs(x.mean()) < 0.01 and abs(x.var() * 16 - 1) < 0.05


@pytest.mark.parametrize("bonus", ["none", "rnd", "e3b"])
def test_vmapped_training_has_no_lapack_calls(bonus):
    """Batched LAPACK kernels (e.g. QR in flax's orthogonal init) deadlock XLA:CPU's 2-thread pool under vmap (a
    vmapped PPO+RND run hung in its init with flax's orthogonal in RND's networks). Reward transforms included."""
    from jaxrl_pref.rewards.bonus import BonusConfig, with_bonus
    cfg = ppo.Config(num_envs=4, num_steps=16, total_timesteps=4 * 16 * 2)
    reward = with_bonus(None, BonusConfig(bonus=bonus), cfg.num_envs)
    hlo = jax.jit(jax.vmap(ppo.make_train(cfg, reward=reward))).lower(
        jax.random.split(jax.random.PRNGKey(0), 8)).as_text()
    assert "lapack" not in hlo.lower()
