"""The sparse-reward suite (envs/sparse.py): registration, success metric, pay-only-on-success wrappers, KeyDoor."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import sparse
from jaxrl_pref.rollout import collect, episode_metrics


def _random_rollout(name, n=8, steps=64, seed=0, **kw):
    env, p = envs.make(name, num_envs=n, **kw)
    sp = envs.spec(env, p)

    def pol(o, k):
        if sp.discrete:
            a = jax.random.randint(k, (n,), 0, sp.num_actions)
        else:
            a = jax.random.uniform(k, (n, sp.num_actions), minval=-1.0, maxval=1.0)
        return a, jnp.zeros(n), jnp.zeros(n)

    obs, st = env.reset(jax.random.PRNGKey(seed), p)
    _, _, tr = jax.jit(lambda s, o, k: collect(env, p, pol, s, o, k, steps))(st, obs, jax.random.PRNGKey(seed + 1))
    return tr


def test_every_task_registered():
    assert set(sparse.tasks()) <= set(envs.registered())
    for name in ("SparseCartPole-v1", "DeepSea-8", "KeyDoor-9", "SparseFourRooms-v0"):
        env, p = envs.make(name)
        assert envs.spec(env, p).num_actions >= 1


# fast: two tasks; slow: every task of the suite (CartPole/MountainCar/DeepSea/KeyDoor also have own tests)
@pytest.mark.parametrize("name", ["DeepSea-5", "KeyDoor-5"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in sorted(sparse.tasks()) if n not in ("DeepSea-5", "KeyDoor-5")])
def test_tasks_jittable_with_success(name):
    kw = {"max_steps_in_episode": 10} if "DeepSea" not in name else {}
    tr = _random_rollout(name, steps=24, **kw)
    succ = np.asarray(tr.info["episode_success"])
    done = np.asarray(tr.done)
    assert set(np.unique(succ)) <= {0.0, 1.0}
    assert not (succ.astype(bool) & ~done).any(), "success is only reported on an episode's last step"
    m = episode_metrics(tr.info)
    assert "episode_success" in m


def test_pay_only_on_success_cartpole_survival():
    tr = _random_rollout("SparseCartPole-v1", n=16, steps=60, max_steps_in_episode=15)
    r, te, tu = (np.asarray(x) for x in (tr.reward, tr.terminated, tr.truncated))
    np.testing.assert_array_equal(r, (tu & ~te).astype(np.float32))
    np.testing.assert_array_equal(r, np.asarray(tr.info["episode_success"]))
    assert 0 < r.sum() and te.any()  # both outcomes happen in 16 x 60 random steps with a 15-step limit
    # the episode-stats path reports the success rate of finished episodes
    m = episode_metrics(tr.info)
    done = np.asarray(tr.done)
    assert float(m["episode_success"]) == pytest.approx(r[done].mean())


def test_sparse_mountain_car_pays_one_at_goal_only():
    env, p = envs.make("SparseMountainCar-v0")
    _, st = env.reset(jax.random.PRNGKey(0), p)
    inner = st.env_state.replace(position=jnp.float32(0.49), velocity=jnp.float32(0.07))
    st = st.replace(env_state=inner)
    _, _, r, te, tu, info = env.step(jax.random.PRNGKey(1), st, 2, p)
    assert bool(te) and float(r) == 1.0 and float(info["episode_success"]) == 1.0
    assert float(info["episode_return"]) == 1.0
    tr = _random_rollout("SparseMountainCar-v0", steps=50)
    assert float(np.abs(np.asarray(tr.reward)).sum()) == 0.0  # no per-step cost any more


def _deep_sea_episode(size, right: bool):
    env, p = envs.make(f"DeepSea-{size}")
    obs, st = env.reset(jax.random.PRNGKey(0), p)
    total, succ = 0.0, 0.0
    for _ in range(size):
        inner = st.env_state
        a_right = inner.action_mapping[inner.row, inner.column]
        a = a_right if right else 1 - a_right
        obs, st, r, te, tu, info = env.step(jax.random.PRNGKey(1), st, a, p)
        total += float(r)
        succ = float(info["episode_success"])
    assert bool(te)
    return total, succ


def test_deep_sea_success_only_on_treasure():
    total, succ = _deep_sea_episode(6, right=True)
    assert succ == 1.0 and total == pytest.approx(0.99, abs=1e-6)
    total, succ = _deep_sea_episode(6, right=False)
    assert succ == 0.0 and total == 0.0


def _kd_step(step, p, st, a):
    return step(jax.random.PRNGKey(3), st, jnp.int32(a), p)


def test_key_door_scripted_solution_and_locked_door():
    env, p = envs.make("KeyDoor-5", random_start=False)
    obs, st = env.reset(jax.random.PRNGKey(0), p)
    step = jax.jit(env.step)
    assert obs.shape == (26,) and float(obs[0]) == 1.0 and float(obs[-1]) == 0.0
    # without the key the door (row 2, col 2) stays shut: go down to row 2, then right twice
    s = st
    for a in (2, 2, 1, 1):
        _, s, r, te, tu, info = _kd_step(step, p, s, a)
    assert tuple(np.asarray(s.env_state.pos)) == (2, 1) and not bool(te)
    # key at (4, 0), then door, then goal at (0, 4): down x4, right x2 (through the door), up x2, right x2
    s, rets = st, []
    for a in (2, 2, 2, 2, 0, 0, 1, 1, 1, 0, 0, 1):
        _, s, r, te, tu, info = _kd_step(step, p, s, a)
        rets.append(float(r))
    assert bool(te) and float(info["episode_success"]) == 1.0 and rets[-1] == 1.0 and sum(rets) == 1.0
    assert int(info["episode_length"]) == 12


def test_key_door_slip_and_random_start():
    _, p = envs.make("KeyDoor-7")
    assert p.max_steps_in_episode == 42 and p.slip_prob == 0.0
    env, p = envs.make("KeyDoor-7", num_envs=64)
    obs, st = jax.jit(env.reset)(jax.random.PRNGKey(0), p)
    cols = np.asarray(st.env_state.pos)[:, 1]
    assert (cols < 3).all() and len(np.unique(np.asarray(st.env_state.pos), axis=0)) > 5
    # slip_prob=1: actions are ignored, moves are random -> a fixed "up" action still changes columns
    env, p = envs.make("KeyDoor-7", num_envs=64, slip_prob=1.0)
    obs, st = jax.jit(env.reset)(jax.random.PRNGKey(0), p)
    _, st2, *_ = jax.jit(env.step)(jax.random.PRNGKey(1), st, jnp.zeros(64, jnp.int32), p)
    assert (np.asarray(st2.env_state.pos)[:, 1] != np.asarray(st.env_state.pos)[:, 1]).any()
    with pytest.raises(ValueError, match="odd"):
        sparse.KeyDoor(6)


def test_unknown_kwarg_names_valid_fields():
    with pytest.raises(ValueError, match="slip_prob"):
        envs.make("KeyDoor-5", slipprob=0.1)
