"""The sparse-reward suite (envs/sparse.py): registration, success metric, pay-only-on-success wrappers, KeyDoor."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import sparse
from jaxrl_pref.rollout import collect, episode_metrics
from jaxrl_pref.stats import final_score


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
    # the spec each task is documented to have: (discrete, actions, observation shape, horizon)
    want = {"SparseCartPole-v1": (True, 2, (4,), 500), "DeepSea-8": (True, 2, (64,), 8),
            "KeyDoor-9": (True, 4, (82,), 54), "SparseFourRooms-v0": (True, 4, (4,), 500)}
    for name, spec in want.items():
        env, p = envs.make(name)
        sp = envs.spec(env, p)
        assert (sp.discrete, sp.num_actions, sp.obs_shape, p.max_steps_in_episode) == spec, name


# DeepSea and KeyDoor step integers only, so a long random rollout (256 envs x 64 steps) is cheap. The number of its
# episodes that succeed is a binomial draw, checked against the binomial's 1e-6 tails (a random stream's outcome is
# not pinned: DeepSea-10 expects 1.5 successes and has none w.p. 0.22, KeyDoor-7 0.69 and none w.p. 0.5). Per-episode
# success probability of uniformly random play: DeepSea-N exactly 2^-N (N "right" moves in a row); KeyDoor measured,
# (successes, episodes) over 64 seeds (``python -m benchmarks.learning_spread --task random_success --set-size 64``,
# 2026-12-07; the same run gave DeepSea's 2^-N, e.g. 94 of 98304 DeepSea-10 episodes, 96 expected, and 16360 of
# 262144 DeepSea-4, 16384 expected). Another random stream (another key, a changed key split) fails the check w.p.
# < 2e-6 per task (DeepSea: exact; KeyDoor: if its rate lies in the measured 99.99% interval). The other tasks get a
# short rollout with 10-step episodes, where a success is mostly out of random play's reach (their own tests script
# one).
RANDOM_P = {f"DeepSea-{k}": 2.0 ** -k for k in sparse.SIZES}
RANDOM_MEASURED = {"KeyDoor-5": (396, 32769), "KeyDoor-7": (44, 16388), "KeyDoor-9": (7, 16384)}
# KeyDoorLever-N moves as KeyDoor-N does (its lever is a wall cell that only adds a caption): the same rate
RANDOM_MEASURED.update({f"KeyDoorLever-{n}": RANDOM_MEASURED[f"KeyDoor-{n}"] for n in sparse.SIZES_KDL})


def random_success_bounds(name: str, episodes: int, tail: float = 1e-6) -> tuple[int, int]:
    """``(lo, hi)``: uniformly random play succeeds in fewer than ``lo`` or more than ``hi`` of ``episodes``
    episodes of ``name`` w.p. < ``tail`` each (KeyDoor: at the ends of its measured rate's 99.99% interval)."""
    from scipy import stats
    if name in RANDOM_P:
        p_lo = p_hi = RANDOM_P[name]
    else:
        k, n = RANDOM_MEASURED[name]
        p_lo, p_hi = stats.beta.ppf(5e-5, k, n - k + 1), stats.beta.ppf(1 - 5e-5, k + 1, n - k)
    return int(stats.binom.ppf(tail, episodes, p_lo)), int(stats.binom.isf(tail, episodes, p_hi))


# fast: two tasks; slow: every task of the suite (CartPole/MountainCar/DeepSea/KeyDoor also have own tests)
@pytest.mark.parametrize("name", ["DeepSea-5", "KeyDoor-5"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in sorted(sparse.tasks()) if n not in ("DeepSea-5", "KeyDoor-5")])
def test_tasks_jittable_with_success(name):
    integer = name.startswith(("DeepSea", "KeyDoor"))
    if integer:
        tr = _random_rollout(name, n=256, steps=64)
    else:
        kw = {"max_steps": 10} if name.startswith("MiniGrid-") else {"max_steps_in_episode": 10}
        tr = _random_rollout(name, steps=24, **kw)
    succ = np.asarray(tr.info["episode_success"])
    done = np.asarray(tr.done)
    reward = np.asarray(tr.reward)
    assert set(np.unique(succ)) <= {0.0, 1.0}
    won = succ.astype(bool)
    assert not (won & ~done).any(), "success is only reported on an episode's last step"
    assert (reward[won] > 0).all(), "a successful step pays"
    if integer:
        lo, hi = random_success_bounds(name, int(done.sum()))
        assert lo <= won.sum() <= hi, f"{int(won.sum())} random successes in {int(done.sum())} {name} episodes, " \
                                      f"expected {lo}..{hi}"
        assert (done & ~won).any(), "most random episodes fail"
        np.testing.assert_array_equal(won, reward > 0)  # these pay a positive reward at success and nowhere else
    m = episode_metrics(tr.info)
    if done.any():
        assert float(m["episode_success"]) == pytest.approx(won.sum() / done.sum())


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


# -- xminigrid (extra "grid") ---------------------------------------------------------------------------------

FWD, RIGHT, LEFT, PICK, DROP, TOGGLE = range(6)  # xminigrid's actions


def _xmg_step(step, p, st, a):
    return step(jax.random.PRNGKey(3), st, jnp.int32(a), p)


def _xmg_obs_parts(obs, env):
    """(view tiles [7, 7], view colours [7, 7], direction, pocket tile, pocket colour) decoded from one-hots."""
    base = env.unwrapped
    t, c = base.num_tiles, base.num_colors
    n = 7 * 7
    tiles = np.asarray(obs[:n * t]).reshape(7, 7, t)
    colours = np.asarray(obs[n * t:n * (t + c)]).reshape(7, 7, c)
    rest = np.asarray(obs[n * (t + c):])
    assert (tiles.sum(-1) == 1).all() and (colours.sum(-1) == 1).all() and rest[:4].sum() == 1
    return tiles.argmax(-1), colours.argmax(-1), rest[:4].argmax(), rest[4:4 + t].argmax(), rest[4 + t:].argmax()


def test_xminigrid_registered_spec_and_observation():
    pytest.importorskip("xminigrid")
    names = [n for n in envs.registered() if n.startswith("MiniGrid-")]
    assert {"MiniGrid-DoorKey-5x5", "MiniGrid-Empty-5x5", "MiniGrid-UnlockPickUp"} <= set(names)
    assert not [n for n in envs.registered() if n.startswith("XLand-")]  # need a downloaded ruleset: left out
    env, p = envs.make("MiniGrid-DoorKey-5x5", num_envs=4)
    sp = envs.spec(env, p)
    assert sp.discrete and sp.num_actions == 6 and sp.obs_shape == (7 * 7 * 25 + 4 + 25,)
    obs, st = jax.jit(env.reset)(jax.random.PRNGKey(0), p)
    chex.assert_shape(obs, (4, 1254))
    chex.assert_type(obs, jnp.float32)
    for i in range(4):
        tiles, colours, direction, pocket, _ = _xmg_obs_parts(obs[i], env)
        assert direction == int(st.env_state.state.agent.direction[i]) and pocket == 0
        assert tiles[6, 3] == 1 and (tiles == 7).sum() <= 1  # the agent's own cell (floor), one key at most
    with pytest.raises(ValueError, match="max_steps"):
        envs.make("MiniGrid-DoorKey-5x5", max_steps_in_episode=10)


def test_xminigrid_empty_scripted_success_and_auto_reset():
    pytest.importorskip("xminigrid")
    env, p = envs.make("MiniGrid-Empty-5x5")
    obs, st = env.reset(jax.random.PRNGKey(0), p)
    agent = st.env_state.state.agent
    assert tuple(np.asarray(agent.position)) == (1, 1) and int(agent.direction) == 1  # goal at (3, 3)
    step = jax.jit(env.step)
    rewards = []
    for a in (FWD, FWD, RIGHT, FWD, FWD):
        obs, st, r, te, tu, info = _xmg_step(step, p, st, a)
        rewards.append(float(r))
    assert bool(te) and not bool(tu) and float(info["episode_success"]) == 1.0
    assert rewards[:-1] == [0.0] * 4 and rewards[-1] == pytest.approx(1 - 0.9 * 5 / p.max_steps)
    assert float(info["episode_return"]) == pytest.approx(rewards[-1]) and int(info["episode_length"]) == 5
    assert int(st.env_state.state.step_num) == 0  # auto-reset: the returned state is the next episode's


def test_xminigrid_door_key_scripted_and_locked_door():
    pytest.importorskip("xminigrid")
    env, p = envs.make("MiniGrid-DoorKey-5x5")
    obs, st = env.reset(jax.random.PRNGKey(0), p)
    grid = np.asarray(st.env_state.state.grid[..., 0])
    agent = st.env_state.state.agent
    # the layout of PRNGKey(0): agent at (2, 1) facing up, key (7) below it, locked door (8) at (1, 2), goal (3, 3)
    assert tuple(np.asarray(agent.position)) == (2, 1) and int(agent.direction) == 0
    assert grid[3, 1] == 7 and grid[1, 2] == 8 and grid[3, 3] == 6
    step = jax.jit(env.step)
    # without the key, toggling the locked door does nothing and the agent cannot walk through it
    s = st
    for a in (FWD, RIGHT, TOGGLE, FWD):
        _, s, r, te, tu, info = _xmg_step(step, p, s, a)
    assert tuple(np.asarray(s.env_state.state.agent.position)) == (1, 1) and int(s.env_state.state.grid[1, 2, 0]) == 8
    # turn to the key, pick it up (it shows in the observation's pocket), open the door, walk to the goal
    s = st
    for a in (RIGHT, RIGHT, PICK):
        obs, s, r, te, tu, info = _xmg_step(step, p, s, a)
    assert _xmg_obs_parts(obs, env)[3] == 7
    rewards = []
    for a in (LEFT, LEFT, FWD, RIGHT, TOGGLE, FWD, FWD, RIGHT, FWD, FWD):
        obs, s, r, te, tu, info = _xmg_step(step, p, s, a)
        rewards.append(float(r))
    assert bool(te) and float(info["episode_success"]) == 1.0 and sum(rewards) == pytest.approx(1 - 0.9 * 13 / 250)


def test_xminigrid_time_limit_truncates_without_success():
    pytest.importorskip("xminigrid")
    env, p = envs.make("MiniGrid-Empty-5x5", num_envs=2, max_steps=4)
    obs, st = env.reset(jax.random.PRNGKey(0), p)
    step = jax.jit(env.step)
    flags = []
    for _ in range(4):  # turning in place never reaches the goal
        obs, st, r, te, tu, info = step(jax.random.PRNGKey(1), st, jnp.full(2, LEFT, jnp.int32), p)
        flags.append((bool(te.any()), bool(tu.all()), float(r.sum()), float(info["episode_success"].sum())))
    assert flags[:3] == [(False, False, 0.0, 0.0)] * 3 and flags[3] == (False, True, 0.0, 0.0)
    assert (np.asarray(info["episode_length"]) == 4).all()


def test_xminigrid_missing_package_names_the_extra(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "xminigrid", None)  # import xminigrid now raises ImportError
    for name in ("MiniGrid-DoorKey-5x5", "MiniGrid-NotAnEnv"):  # registered or not, the error names the extra
        with pytest.raises(ModuleNotFoundError, match=r"\.\[grid\]"):
            envs.make(name)


@pytest.mark.slow
def test_ppo_learns_xminigrid_door_key_5x5():
    """PPO (MLP on the one-hot view + direction + pocket) on MiniGrid-DoorKey-5x5, 123k steps per seed, 8 seeds in one
    program. A uniformly random policy solves 10% of its 250-step episodes (return ~0.04).

    Fixed seeds do not fix the outcome across machines (float summation order: issue 18 saw seed 3 end at return
    0.667 and success 0.919 on another 2-core machine), and now and then a run fails outright, so the bounds are on
    the seed set: at least 5 of 8 seeds solve it (success >= 0.9 over the last 5 updates) and the median final return
    is >= 0.8. Measured (``python -m benchmarks.learning_spread --task xminigrid_door_key``, 2026-12-02, 36 seeds):
    35 solve it (success >= 0.93; one run failed outright: success 0.07, return 0.06); final returns ~0.96, but
    0.78 and 0.66 on two slow seeds (cf. issue 18's 0.667). Per 8-seed set 8, 7, 8, 8 seeds solve it and the median
    return is 0.960-0.964. At per-seed rates (misses + 1) / (N + 2) of 0.053 (unsolved) and 0.105 (return < 0.8)
    the bounds fail w.p. 0.05% and at most 0.6% (4 of 8 below); the old bounds (all 4 seeds >= 0.8 and >= 0.95)
    failed w.p. about 30%."""
    from agents import ppo
    cfg = ppo.Config(env_name="MiniGrid-DoorKey-5x5", num_envs=32, num_steps=64, total_timesteps=32 * 64 * 60,
                     learning_rate=3e-4, update_epochs=8, num_minibatches=8)
    out = jax.jit(jax.vmap(ppo.make_train(cfg)))(jax.random.split(jax.random.PRNGKey(0), 8))
    ret = final_score(out.metrics["episode_return"], last=5)
    success = final_score(out.metrics["episode_success"], last=5)
    tr = _random_rollout("MiniGrid-DoorKey-5x5", n=32, steps=500)
    random_return = float(episode_metrics(tr.info)["episode_return"])
    assert random_return < 0.2, random_return
    assert (success >= 0.9).sum() >= 5 and np.median(ret) >= 0.8, (ret, success)
