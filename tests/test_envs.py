"""Env layer: gymnax 1.0 six-value step, terminated vs truncated, auto-reset, episode stats, flattening."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from gymnax.environments import spaces

import envs


@struct.dataclass
class CountState:
    pos: jax.Array
    time: jax.Array


@struct.dataclass
class CountParams:
    goal: int = 3
    max_steps_in_episode: int = 5


class Counter:
    """obs = [pos, time]; action 1 moves +1 (reward 1), 0 stays (reward 0); terminates at pos == goal,
    truncates at time == max_steps_in_episode. Reset puts pos at 0 (deterministic)."""

    def reset_env(self, key, params):
        s = CountState(jnp.int32(0), jnp.int32(0))
        return self.obs(s), s

    def obs(self, s):
        return jnp.stack([s.pos, s.time]).astype(jnp.float32)

    def step_env(self, key, s, action, params):
        s = CountState(s.pos + action, s.time + 1)
        return self.obs(s), s, action.astype(jnp.float32), s.pos >= params.goal, {}

    def is_truncated(self, s, params):
        return s.time >= params.max_steps_in_episode

    def observation_space(self, params):
        return spaces.Box(0, 100, (2,), jnp.float32)

    def action_space(self, params):
        return spaces.Discrete(2)


envs.register("Counter-test", lambda **kw: (Counter(), CountParams(**kw)))


def run(env, params, actions, key=jax.random.PRNGKey(0)):
    obs, state = env.reset(key, params)
    out = []
    for a in actions:
        key, k = jax.random.split(key)
        o, state, r, te, tr, info = env.step(k, state, jnp.int32(a), params)
        out.append((obs, o, r, te, tr, info))
        obs = o
    return out


def test_termination_autoreset_and_stats():
    env, params = envs.make("Counter-test")
    steps = run(env, params, [1, 1, 1, 1])
    # step 3 reaches pos 3: terminated, not truncated; obs is the reset obs, final_obs the terminal one
    _, o, r, te, tr, info = steps[2]
    assert bool(te) and not bool(tr)
    np.testing.assert_array_equal(info["final_obs"], [3.0, 3.0])
    np.testing.assert_array_equal(o, [0.0, 0.0])
    assert bool(info["episode_done"]) and float(info["episode_return"]) == 3.0 and int(info["episode_length"]) == 3
    # the next episode starts from scratch
    _, o, r, te, tr, info = steps[3]
    np.testing.assert_array_equal(o, [1.0, 1.0])
    assert not bool(info["episode_done"]) and float(info["episode_return"]) == 0.0


def test_truncation_is_not_termination():
    env, params = envs.make("Counter-test", max_steps_in_episode=4)
    steps = run(env, params, [0, 0, 1, 0, 0])
    flags = [(bool(s[3]), bool(s[4])) for s in steps]
    assert flags == [(False, False)] * 3 + [(False, True), (False, False)]
    _, o, r, te, tr, info = steps[3]
    np.testing.assert_array_equal(info["final_obs"], [1.0, 4.0])  # true last obs, not the reset one
    np.testing.assert_array_equal(o, [0.0, 0.0])
    assert float(info["episode_return"]) == 1.0 and int(info["episode_length"]) == 4


def test_terminated_and_truncated_never_both():
    env, params = envs.make("Counter-test", goal=3, max_steps_in_episode=3)
    _, _, _, te, tr, _ = run(env, params, [1, 1, 1])[2]
    assert bool(te) and not bool(tr)


def test_batched_env_matches_single_envs():
    n = 3
    benv, params = envs.make("CartPole-v1", num_envs=n, max_steps_in_episode=20)
    senv, _ = envs.make("CartPole-v1", max_steps_in_episode=20)
    key = jax.random.PRNGKey(3)
    obs, state = benv.reset(key, params)
    chex.assert_shape(obs, (n, 4))
    chex.assert_type(obs, jnp.float32)
    step = jax.jit(benv.step)
    done_seen = 0
    for t in range(40):
        key, k = jax.random.split(key)
        o, state, r, te, tr, info = step(k, state, jnp.ones(n, jnp.int32), params)
        chex.assert_shape([r, te, tr, info["episode_done"]], (n,))
        chex.assert_shape(info["final_obs"], (n, 4))
        done = np.asarray(te | tr)
        done_seen += done.sum()
        assert not np.any(np.asarray(te & tr))
        # finished envs restart near the origin; others continue from their final obs
        np.testing.assert_array_equal(np.asarray(o)[~done], np.asarray(info["final_obs"])[~done])
        assert np.all(np.abs(np.asarray(o)[done]) <= 0.05)
    assert done_seen > 0
    # per-env semantics equal: vmapped single env over the same split keys gives the same reset
    so, _ = jax.vmap(senv.reset, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(3), n), params)
    np.testing.assert_allclose(so, benv.reset(jax.random.PRNGKey(3), params)[0])


def test_flatten_minatar():
    """Breakout-MinAtar's [10, 10, 4] boolean channels (paddle, ball, trail, bricks) arrive flattened to float32 in
    gymnax's own order, after the reset and after every step."""
    import gymnax
    env, params = envs.make("Breakout-MinAtar")
    raw, _ = gymnax.make("Breakout-MinAtar")
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    chex.assert_shape(obs, (400,))
    chex.assert_type(obs, jnp.float32)
    assert envs.spec(env, params).obs_shape == (400,)
    np.testing.assert_array_equal(obs, np.asarray(raw.get_obs(state.env_state), np.float32).reshape(-1))
    # one paddle, ball and trail cell; three rows of ten bricks
    np.testing.assert_array_equal(np.asarray(obs).reshape(10, 10, 4).sum(axis=(0, 1)), [1, 1, 1, 30])
    step = jax.jit(env.step)
    for t in range(6):
        obs, state, *_ = step(jax.random.PRNGKey(t), state, jnp.int32(t % 3), params)
        np.testing.assert_array_equal(obs, np.asarray(raw.get_obs(state.env_state), np.float32).reshape(-1))


def test_continuous_spec_and_clip():
    env, params = envs.make("Pendulum-v1")
    spec = envs.spec(env, params)
    assert not spec.discrete and spec.num_actions == 1 and spec.action_low == (-2.0,)
    obs, s = env.reset(jax.random.PRNGKey(0), params)
    _, _, r_big, *_ = env.step(jax.random.PRNGKey(1), s, jnp.array([100.0]), params)
    _, _, r_max, *_ = env.step(jax.random.PRNGKey(1), s, jnp.array([2.0]), params)
    assert r_big.shape == () and float(r_big) == pytest.approx(float(r_max))  # action clipped to the bound


def test_normalizers_keep_true_episode_return():
    env, params = envs.make("CartPole-v1", num_envs=2, normalize_obs=True, normalize_reward=True)
    obs, state = env.reset(jax.random.PRNGKey(0), params)
    rets = []
    for t in range(60):
        obs, state, r, te, tr, info = env.step(jax.random.PRNGKey(t), state, jnp.zeros(2, jnp.int32), params)
        rets += list(np.asarray(info["episode_return"])[np.asarray(info["episode_done"])])
        assert float(jnp.abs(obs).max()) <= 10.0
    # always pushing left ends CartPole after ~10 steps; EpisodeStats sees the raw +1 rewards
    assert rets and all(float(x).is_integer() and 5 <= x <= 20 for x in rets)


def test_unknown_env_and_bad_kwargs():
    with pytest.raises(ValueError, match="Did you mean CartPole-v1"):
        envs.make("CartPol-v1")
    with pytest.raises(ValueError, match="not parameters of CartPole-v1"):
        envs.make("CartPole-v1", gravity_typo=3.0)
