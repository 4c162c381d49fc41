"""jaxrl_pref.prng: the unrolled Threefry keys draw exactly the default keys' bits, with no XLA loop per hash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_pref import prng

SHAPES = [(1,), (2,), (3,), (4, 2), (7, 3), (128, 2)]


@pytest.fixture(params=[True, False], ids=["partitionable", "original"])
def threefry_mode(request):
    before = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", request.param)
    yield request.param
    jax.config.update("jax_threefry_partitionable", before)


def same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and (a == b).all()


def _draws(k):
    out = [jax.random.split(k)]
    for shape in SHAPES:
        out.append(jax.random.split(k, shape))
        out += [jax.random.bits(k, shape, dtype) for dtype in (jnp.uint8, jnp.uint16, jnp.uint32)]
    out += [jax.random.fold_in(k, d) for d in (0, 3, 2 ** 20)]
    return [prng.raw(x) for x in out]


def test_same_bits_as_default_keys(threefry_mode):
    """split (every shape), bits (8/16/32-bit, odd sizes) and fold_in: the default keys' bits, in either mode."""
    keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2 ** 31 + 7)])
    expected = jax.jit(jax.vmap(_draws))(keys)
    got = jax.jit(jax.vmap(lambda k: _draws(prng.unrolled(k))))(keys)
    assert len(expected) == len(got)
    for i, (a, b) in enumerate(zip(expected, got)):
        assert same(a, b), i
    assert same(jax.random.split(keys[0]), prng.raw(jax.random.split(prng.unrolled(keys[0]))))  # eager too


def test_samplers_match_in_jit_and_vmap():
    def draw(key):
        return (jax.random.normal(key, (5, 3)), jax.random.categorical(key, jnp.zeros((9, 4))),
                jax.random.permutation(key, 33), jax.random.uniform(jax.random.split(key, (3, 2))[2, 1], (2,)))

    keys = jax.random.split(jax.random.PRNGKey(4), 6)
    expected = jax.jit(jax.vmap(draw))(keys)
    got = jax.jit(jax.vmap(lambda k: draw(prng.unrolled(k))))(keys)
    for a, b in zip(expected, got):
        assert same(a, b)


def test_raw_and_unrolled_round_trip():
    k = jax.random.PRNGKey(3)
    u = prng.unrolled(k)
    assert jax.random.key_impl(u) == prng.IMPL and u.shape == ()
    assert same(prng.raw(u), k) and same(prng.raw(k), k)
    assert same(prng.raw(prng.unrolled(jax.random.key(3))), jax.random.key_data(jax.random.key(3)))
    batch = prng.unrolled(jax.random.split(k, 5))  # a batch of raw keys -> a batch of typed keys
    assert batch.shape == (5,)


def test_hash_compiles_without_a_loop():
    """The point of the module: on CPU the default keys' split is an XLA while loop; this one is straight-line."""
    hlo = jax.jit(lambda k: prng.raw(jax.random.split(prng.unrolled(k), 4))).lower(
        jax.random.PRNGKey(0)).compile().as_text()
    assert " while(" not in hlo


@pytest.mark.parametrize("env_name", ["CartPole-v1", "MiniGrid-DoorKey-5x5"])
def test_trainer_numbers_unchanged(monkeypatch, env_name):
    """PPO's rollouts hash with the unrolled keys; a run gives the same numbers as with the default keys, and envs
    that keep their key in their state (xminigrid) still get raw keys."""
    from agents import ppo
    cfg = ppo.Config(env_name=env_name, num_envs=4, num_steps=16, total_timesteps=128, update_epochs=1,
                     num_minibatches=2)
    out = jax.jit(ppo.make_train(cfg))(jax.random.PRNGKey(0))
    assert out.runner_state.key.dtype == jnp.uint32 and out.runner_state.key.shape == (2,)
    monkeypatch.setattr(prng, "unrolled", lambda k: k)
    ref = jax.jit(ppo.make_train(cfg))(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves((out.train_state, out.runner_state.env_state)),
                    jax.tree.leaves((ref.train_state, ref.runner_state.env_state))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
