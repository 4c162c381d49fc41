"""Craftax through envs.make (envs/craftax.py): registration, the missing-package error, the 6-value step with the
time limit split from death, the optimistic auto-reset, the achievement/score episode metrics.

Compiling Craftax's step and world generation takes ~20-30 s on 2 CPU cores, so the fast tests share one compiled
program: 2 seeds (vmap) x 4 envs x 20 random steps of Craftax-Classic with max_timesteps=10 and reset_ratio=2."""
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import craftax as cx
from jaxrl_pref.config import ConfigError
from jaxrl_pref.rollout import episode_metrics

NAME = "Craftax-Classic-Symbolic-v1"
N, T, SEEDS, LIMIT = 4, 20, 2, 10


def test_registered_without_importing_craftax():
    assert set(cx.NAMES) <= set(envs.registered())
    for name in cx.NAMES:
        envs.check_name(name)
    # in a fresh interpreter: importing envs and checking a Craftax name import no craftax module
    code = ("import sys, envs; envs.check_name('Craftax-Symbolic-v1'); "
            "assert not any(m.split('.')[0] == 'craftax' for m in sys.modules), 'craftax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "craftax", None)  # `import craftax` now fails
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[craftax\]"'):
        envs.make(NAME)
    with pytest.raises(ConfigError) as e:
        envs.check_name("Craftax-Symbolic-v1")
    assert "craftax" in str(e.value) and '.[craftax]' in str(e.value)


@pytest.fixture(scope="module")
def rollout():
    pytest.importorskip("craftax")
    env, p = envs.make(NAME, num_envs=N, max_timesteps=LIMIT, reset_ratio=2)
    assert env.unwrapped.__class__.__name__ == "Craftax" and env.num_resets == 2

    def run(key, params):
        k0, k1 = jax.random.split(key)
        obs0, s0 = env.reset(k0, params)

        def body(carry, k):
            obs, s = carry
            ka, ks = jax.random.split(k)
            a = jax.random.randint(ka, (N,), 0, 17)
            obs, s, r, te, tr, info = env.step(ks, s, a, params)
            return (obs, s), (obs, s.env_state.env, r, te, tr, info)

        (obs, s), traj = jax.lax.scan(body, (obs0, s0), jax.random.split(k1, T))
        return obs0, s0, s, traj

    keys = jax.random.split(jax.random.PRNGKey(0), SEEDS)
    out = jax.jit(jax.vmap(run, in_axes=(0, None)))(keys, p)
    return env, p, jax.device_get(out)


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_spec_shapes_dtypes(rollout):
    env, p, (obs0, s0, s, (obs, cstate, r, te, tr, info)) = rollout
    sp = envs.spec(env, p)
    assert sp.discrete and sp.num_actions == 17 and sp.obs_shape == (1345,)
    chex.assert_shape(obs0, (SEEDS, N, 1345))
    chex.assert_shape(obs, (SEEDS, T, N, 1345))
    chex.assert_type([obs0, obs, r], np.float32)
    chex.assert_shape([r, te, tr], (SEEDS, T, N))
    chex.assert_type([te, tr], bool)
    chex.assert_shape(info["final_obs"], (SEEDS, T, N, 1345))
    assert obs.min() >= 0.0 and obs.max() <= 1.0
    # the state is a pytree of arrays (checkpointable): same structure before and after stepping
    chex.assert_trees_all_equal_structs(s0, s)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(s))


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_time_limit_truncates_not_terminates(rollout):
    _, _, (_, _, _, (_, cstate, r, te, tr, info)) = rollout
    assert not (te & tr).any()
    assert not tr[:, : LIMIT - 1].any(), "nothing is cut before the limit"
    # an env that did not die in its first LIMIT steps is truncated (not terminated) at the limit
    np.testing.assert_array_equal(tr[:, LIMIT - 1], ~te[:, :LIMIT].any(axis=1))
    assert tr[:, LIMIT - 1].any()
    np.testing.assert_array_equal(info["episode_length"][tr], LIMIT)
    np.testing.assert_array_equal(info["episode_done"], te | tr)


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_auto_reset_from_fresh_worlds(rollout):
    _, _, (obs0, s0, _, (obs, cstate, _, te, tr, info)) = rollout
    step = LIMIT - 1  # every env not killed earlier is truncated here and starts in a fresh world
    done = te[:, step] | tr[:, step]
    np.testing.assert_array_equal(cstate.timestep[:, step][done], 0)
    np.testing.assert_array_equal(cstate.timestep[:, step][~done], LIMIT)
    assert not cstate.achievements[:, step][done].any()
    # the final observation is the old episode's, the returned one the fresh world's
    for seed, e in zip(*np.nonzero(done)):
        assert not np.array_equal(info["final_obs"][seed, step, e], obs[seed, step, e])
        assert not np.array_equal(cstate.map[seed, step, e], s0.env_state.env.map[seed, e]), "a new world"
    # reset_ratio=2 with 4 envs: 2 fresh worlds; the k-th finished env (in env order) gets world k mod 2
    for seed in range(SEEDS):
        idx = np.flatnonzero(done[seed])
        maps = cstate.map[seed, step]
        for i, e in enumerate(idx):
            for j, f in enumerate(idx[:i]):
                assert np.array_equal(maps[e], maps[f]) == (i % 2 == j % 2), (seed, e, f)


@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_achievement_and_score_metrics(rollout):
    env, _, (_, _, _, (_, cstate, r, te, tr, info)) = rollout
    names = env.unwrapped.achievement_names
    assert len(names) == 22 and env.unwrapped.max_return == 22.0
    keys = [f"episode_achievement_{n}" for n in names]
    assert set(keys) <= set(info) and "episode_score" in info and "episode_success" not in info
    done = te | tr
    ach = np.stack([info[k] for k in keys], -1)  # [seed, T, N, 22]
    assert set(np.unique(ach)) <= {0.0, 1.0}
    assert not ach[~done].any() and not info["episode_score"][~done].any(), "reported on an episode's last step only"
    # score = 100 * episode return / 22, the return the episode-stats wrapper reports
    np.testing.assert_allclose(info["episode_score"], 100.0 * info["episode_return"] / 22.0, atol=1e-4)
    # return = achievements unlocked + 0.1 * (final health - 9), health in [0, 9]
    n_ach = ach.sum(-1)[done]
    ret = info["episode_return"][done]
    assert ((ret <= n_ach + 1e-4) & (ret >= n_ach - 0.9 - 1e-4)).all()
    m = jax.device_get(episode_metrics(info))
    assert float(m["episodes"]) == done.sum()
    assert all(0.0 <= float(m[k]) <= 1.0 for k in keys) and -5.0 <= float(m["episode_score"]) <= 100.0
    np.testing.assert_allclose(float(m["episode_score"]), info["episode_score"][done].mean(), rtol=1e-5)
    np.testing.assert_allclose([float(m[k]) for k in keys], ach[done].mean(0), rtol=1e-5)


def test_unknown_param_is_rejected():
    pytest.importorskip("craftax")
    with pytest.raises(ValueError, match="max_steps_in_episode"):
        envs.make(NAME, max_steps_in_episode=5)
    with pytest.raises(ValueError, match="reset_ratio"):
        envs.make(NAME, reset_ratio=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Craftax-Symbolic-v1", "Craftax-Classic-Pixels-v1"])
def test_other_variants_step(name):
    pytest.importorskip("craftax")
    env, p = envs.make(name, num_envs=2, max_timesteps=3)
    obs, s = jax.jit(env.reset)(jax.random.PRNGKey(0), p)  # eager world generation takes minutes
    sp = envs.spec(env, p)
    chex.assert_shape(obs, (2,) + sp.obs_shape)
    step = jax.jit(env.step)
    cut = []
    for i in range(3):  # NOOP for 3 steps: nobody dies, both envs are cut at the limit
        obs, s, r, te, tr, info = step(jax.random.PRNGKey(i), s, jnp.zeros(2, jnp.int32), p)
        cut.append(bool(tr.all()) and not bool(te.any()))
    assert cut == [False, False, True]
    chex.assert_type(obs, jnp.float32)
    chex.assert_shape(obs, (2,) + sp.obs_shape)
    assert "episode_score" in info
    if name.startswith("Craftax-Symbolic"):
        assert len([k for k in info if k.startswith("episode_achievement_")]) == 67
        assert env.unwrapped.max_return == 226.0


@pytest.mark.slow
def test_craftax_pixels_shapes_without_compiling():
    """Craftax-Pixels-v1 is the full game (stepped above as Craftax-Symbolic-v1) with the pixel observation (stepped
    above as Craftax-Classic-Pixels-v1): its reset and step are traced here, not compiled (compiling it took 198 s
    of a CI run), and give the spec's shapes and dtypes and the episode infos."""
    pytest.importorskip("craftax")
    env, p = envs.make("Craftax-Pixels-v1", num_envs=2, max_timesteps=3)
    sp = envs.spec(env, p)
    obs, s = jax.eval_shape(env.reset, jax.random.PRNGKey(0), p)
    assert obs.shape == (2,) + sp.obs_shape and obs.dtype == jnp.float32
    obs, s, r, te, tr, info = jax.eval_shape(env.step, jax.random.PRNGKey(1), s, jnp.zeros(2, jnp.int32), p)
    assert obs.shape == (2,) + sp.obs_shape and obs.dtype == jnp.float32
    assert r.shape == te.shape == tr.shape == (2,) and te.dtype == tr.dtype == jnp.bool_
    assert "episode_score" in info and len([k for k in info if k.startswith("episode_achievement_")]) == 67
    assert env.unwrapped.max_return == 226.0
