"""NetHack/MiniHack env pool (envs/nethack.py, envs/nle_worker.py) and the host-side PPO loop on it."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("nle")
pytest.importorskip("minihack")

import envs  # noqa: E402
from envs import nethack, nle_worker as W  # noqa: E402

ROOM = "MiniHack-Room-5x5-v0"  # episodes of <= 100 steps: auto-reset happens within a short test
ALL_KEYS = ("glyphs", "glyphs_crop", "chars", "chars_crop", "blstats", "message")


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T stopped, Z zombie...); "X" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "X"


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "X")


def _stop(pid: int) -> None:
    """SIGSTOPs ``pid`` and waits until it is stopped: a command sent after this cannot complete. (It returns as
    soon as /proc says so; the bound only catches a hang: a loaded machine may be slow to deliver the signal.)"""
    os.kill(pid, signal.SIGSTOP)
    assert _wait_until(lambda: _state(pid) in ("T", "t")), _state(pid)


def _shm_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name.lstrip('/')}")


def _wait_until(cond, timeout=120.0):
    """Polls ``cond`` until it holds; ``timeout`` only bounds a hang (it returns as soon as ``cond`` holds), so it is
    generous: a loaded 2-core machine can take seconds to stop, reap or clean up a process."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def _pad_crop(board, x, y, size, pad):
    """Reference crop, written independently of nle_worker.crop."""
    r = size // 2
    big = np.pad(board, r, constant_values=pad)
    return big[y:y + size, x:x + size]


def _record_quits(env) -> list:
    """Makes ``env`` (gym) keep, in the returned list, a copy of the observation on which NLE starts its quit
    sequence (``_quit_game``): the observation an episode ended on, which the pool reports as ``final_obs`` (it
    skips the quit and resets; see ``FastStep(quit=False)``)."""
    u, seen = env.unwrapped, []
    quit_game = u._quit_game

    def recording(observation, done):
        seen.append({k: x.copy() for k, x in u._get_observation(observation).items()})
        return quit_game(observation, done)

    u._quit_game = recording
    return seen


class _Reference:
    """The same envs stepped one by one in this process, seeded as the pool seeds them. Where NLE quits the game
    at an episode's end, the step returns the observation before the quit (what the pool reports)."""

    def __init__(self, task, n, seed, kwargs):
        self.envs = [W.make_env(task, kwargs, ALL_KEYS) for _ in range(n)]
        self.quits = [_record_quits(e) for e in self.envs]
        self.seed, self.episode = seed, [0] * n
        self.obs = [self._reset(i) for i in range(n)]
        self.ret = [0.0] * n
        self.len = [0] * n

    def _reset(self, i):
        self.envs[i].unwrapped.seed(*W.episode_seeds(self.seed, i, self.episode[i]), reseed=False)
        return {k: v.copy() for k, v in self.envs[i].reset()[0].items()}

    def step(self, i, a):
        obs, r, done, trunc, info = self.envs[i].step(int(a))
        obs = self.quits[i].pop() if self.quits[i] else {k: v.copy() for k, v in obs.items()}
        trunc = bool(trunc) or int(info["end_status"]) == -1  # StepStatus.ABORTED: the step limit
        term = bool(done) and not trunc
        self.ret[i] += r
        self.len[i] += 1
        stats = None
        if term or trunc:
            stats = (self.ret[i], self.len[i], int(info["end_status"]) == 2)
            self.episode[i] += 1
            self.ret[i], self.len[i] = 0.0, 0
            self.obs[i] = self._reset(i)
        else:
            self.obs[i] = obs
        return obs, r, term, trunc, stats


def _check_obs(batch, i, ref_obs, what):
    np.testing.assert_array_equal(batch["glyphs"][i], ref_obs["glyphs"], err_msg=what)
    np.testing.assert_array_equal(batch["chars"][i], ref_obs["chars"], err_msg=what)
    np.testing.assert_array_equal(batch["blstats"][i], ref_obs["blstats"], err_msg=what)
    np.testing.assert_array_equal(batch["message"][i], ref_obs["message"], err_msg=what)
    x, y = int(ref_obs["blstats"][0]), int(ref_obs["blstats"][1])
    np.testing.assert_array_equal(batch["glyphs_crop"][i], _pad_crop(ref_obs["glyphs"], x, y, 9, W.PAD_GLYPH))
    np.testing.assert_array_equal(batch["chars_crop"][i], _pad_crop(ref_obs["chars"], x, y, 9, ord(" ")))


# a step_timeout that only bounds a hang: a healthy worker answers long before it, even on a busy 2-core machine
HANG_BOUND = 120.0

# wake-ups (envs.nle_worker): polling then sleeping (default where polling is safe), sleeping at once with flags
# (a 1 us poll), and socket-only (spin=0, the mode of CPUs other than x86-64)
SPINS = [None, 1e-6, 0.0] if W.SPIN_DEFAULT > 0 else [0.0]


@pytest.mark.parametrize("spin", SPINS, ids=lambda s: f"spin={s}")
@pytest.mark.parametrize("task,steps", [(ROOM, 150), ("NetHackScore-v0", 25)])
def test_batched_equals_envs_stepped_one_by_one(task, steps, spin):
    n, seed = 4, 3
    pool, params = envs.make(task, num_envs=n, num_workers=2, seed=seed, obs_keys=ALL_KEYS, spin=spin)
    assert params is None and isinstance(pool, nethack.NLEPool)
    try:
        ref = _Reference(task, n, seed, pool.env_kwargs)
        obs = pool.reset()
        spec = pool.observation_spec()
        assert set(obs) == set(ALL_KEYS)
        for k, (shape, dtype) in spec.items():
            assert obs[k].shape == (n,) + shape and obs[k].dtype == dtype, k
        assert obs["message"].dtype == np.uint8 and obs["message"].shape == (n, 256)
        for i in range(n):
            _check_obs(obs, i, ref.obs[i], f"reset env {i}")
        rng = np.random.default_rng(0)
        ended = 0
        for t in range(steps):
            a = rng.integers(pool.num_actions, size=n)
            obs, r, term, trunc, info = pool.step(a)
            for i in range(n):
                fin, rr, te, tr, stats = ref.step(i, a[i])
                what = f"step {t} env {i}"
                _check_obs(info["final_obs"], i, fin, what)  # the observation the step led to
                _check_obs(obs, i, ref.obs[i], what)        # after auto-reset where the episode ended
                assert r[i] == pytest.approx(rr, abs=1e-6) and term[i] == te and trunc[i] == tr, what
                assert bool(info["episode_done"][i]) == (stats is not None), what
                if stats is not None:
                    ended += 1
                    assert info["episode_return"][i] == pytest.approx(stats[0], abs=1e-4), what
                    assert info["episode_length"][i] == stats[1], what
                    assert info["episode_success"][i] == stats[2], what
                    assert info["episode_depth"][i] >= 1
        if task == ROOM:
            assert ended >= 4, "expected auto-resets within the test"
            assert "episode_success" in info
        else:
            assert "episode_success" not in info  # NetHackScore defines no success
    finally:
        pool.close()


# Every NetHack task family FastStep computes itself, one whose reward it hands to the task (Scout), MiniHack with
# and without a reward manager, NLE's own step limit and gym's TimeLimit (max_episode_steps), and random actions
# long enough to see deaths, menus and quits.
FAST_CASES = [  # (task, kwargs, random steps, end statuses the run must include: -1 step limit, 1 death, 2 success)
    ("NetHackScore-v0", {}, 3000, {1}), ("NetHackStaircase-v0", {}, 3000, {1}),
    ("NetHackStaircasePet-v0", {}, 1000, set()), ("NetHackGold-v0", {}, 1000, set()),
    ("NetHackEat-v0", {}, 1000, set()), ("NetHackScout-v0", {}, 1000, set()), ("NetHackOracle-v0", {}, 300, set()),
    ("NetHackScore-v0", {"nle_limit": 40}, 150, {-1}), ("NetHackStaircase-v0", {"max_episode_steps": 30}, 150, set()),
    (ROOM, {}, 400, {-1, 2}), ("MiniHack-Corridor-R2-v0", {}, 600, {2}), ("MiniHack-Eat-Fixed-v0", {}, 300, {-1})]


@pytest.mark.parametrize("task,kwargs,steps,must_see", FAST_CASES,
                         ids=[f"{t}{'-' + next(iter(k)) if k else ''}" for t, k, *_ in FAST_CASES])
def test_fast_step_equals_gym_step(task, kwargs, steps, must_see):
    """The worker's FastStep gives gym's step results exactly: observations, reward, flags and end status."""
    kwargs = dict(kwargs)
    nle_limit = kwargs.pop("nle_limit", None)
    keys = ("glyphs", "chars", "blstats", "message")
    gym_env, fast_env, pool_env = (W.make_env(task, {"fix_moon_phase": True, **kwargs}, keys) for _ in range(3))
    assert W.FastStep.supports(fast_env), task
    fast = W.FastStep(fast_env)
    no_quit = W.FastStep(pool_env, quit=False)  # as the pool steps: no quit sequence at an episode's end
    quits = _record_quits(gym_env)
    assert (fast.kind == "other") == (task == "NetHackScout-v0") and (fast.rm is not None) == ("Eat" in task
                                                                                              and "Mini" in task)
    if nle_limit:
        for e in (gym_env, fast_env, pool_env):
            e.unwrapped._max_episode_steps = nle_limit
    rng = np.random.default_rng(1)
    episode, ends, statuses, quit_ends = 0, 0, set(), 0

    def reset():
        for e in (gym_env, fast_env, pool_env):
            e.unwrapped.seed(*W.episode_seeds(5, 0, episode), reseed=False)
        a, b, c = gym_env.reset()[0], fast_env.reset()[0], pool_env.reset()[0]
        for k in keys:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], c[k])

    reset()
    for t in range(steps):
        a = int(rng.integers(gym_env.action_space.n))
        obs, r, done, trunc, info = gym_env.step(a)
        obs = {k: v.copy() for k, v in obs.items()}
        fobs, fr, fdone, ftrunc, fstatus = fast.step(a)
        what = f"{task} step {t}"
        for k in keys:
            np.testing.assert_array_equal(fobs[k], obs[k], err_msg=f"{what}: {k}")
        assert (fr, fdone, ftrunc, fstatus) == (r, done, trunc, int(info["end_status"])), what
        assert type(fr) is float
        pobs, *rest = no_quit.step(a)
        assert tuple(rest) == (fr, fdone, ftrunc, fstatus), what
        before_quit = quits.pop() if quits else None  # gym quit the game in this step: compare with before it
        quit_ends += before_quit is not None
        for k in keys:
            np.testing.assert_array_equal(pobs[k], obs[k] if before_quit is None else before_quit[k],
                                          err_msg=f"{what} (quit=False): {k}")
        statuses.add(fstatus)
        if done or trunc:
            ends += 1
            episode += 1
            reset()
    assert must_see <= statuses, f"{task}: the run saw end statuses {statuses}, the test needs {must_see}"
    assert ends >= 1 or "max_episode_steps" not in kwargs  # gym's TimeLimit truncated (status stays 0)
    assert quit_ends >= 1 or not must_see - {1}, f"{task}: no episode ended by a quit"  # success or step limit
    for e in (gym_env, fast_env, pool_env):
        e.close()


def test_fast_step_refuses_what_it_does_not_replay():
    env = W.make_env("NetHackChallenge-v0", {}, ("glyphs", "blstats", "message"))
    try:
        assert not W.FastStep.supports(env)  # its own abort rule (no progress for 10k steps)
    finally:
        env.close()
    env = W.make_env("MiniHack-KeyRoom-Fixed-S5-v0", {}, ("glyphs", "blstats", "message"))
    try:
        assert not W.FastStep.supports(env)  # its own step (applies the key for the agent)
    finally:
        env.close()
    import gymnasium as gym
    env = gym.wrappers.ClipReward(W.make_env("NetHackScore-v0", {}, ("glyphs", "blstats", "message")), -1, 1)
    try:
        assert not W.FastStep.supports(env)  # a wrapper it does not know
        slot = W.EnvSlot(env, 0, W.views(bytearray(W.layout(1, ("blstats",))[1]), W.layout(1, ("blstats",))[0]),
                         ("blstats",), 0)
        assert slot.fast is None
    finally:
        env.close()


def _check_group(ref, g, actions, result, when, size=4):
    """Checks one group's ``recv`` result against the reference envs ``[g * size, (g + 1) * size)`` stepped with
    ``actions``; returns how many episodes ended."""
    obs, r, term, trunc, info = result
    ended = 0
    for j in range(size):
        i = size * g + j
        fin, rr, te, tr, stats = ref.step(i, actions[j])
        what = f"{when} group {g} env {i}"
        _check_obs(info["final_obs"], j, fin, what)
        _check_obs(obs, j, ref.obs[i], what)
        assert r[j] == pytest.approx(rr, abs=1e-6) and term[j] == te and trunc[j] == tr, what
        assert bool(info["episode_done"][j]) == (stats is not None), what
        if stats is not None:
            ended += 1
            assert info["episode_length"][j] == stats[1], what
            assert info["episode_return"][j] == pytest.approx(stats[0], abs=1e-4), what
    return ended


@pytest.mark.parametrize("spin", SPINS, ids=lambda s: f"spin={s}")
def test_groups_pipelined_equal_envs_stepped_one_by_one(spin):
    """Two groups stepped with send/recv (one group in flight while the other's results are read) give exactly
    the sequential envs' results."""
    n, seed, task = 8, 4, ROOM
    with nethack.NLEPool(task, num_envs=n, num_workers=2, num_groups=2, seed=seed, obs_keys=ALL_KEYS,
                         spin=spin) as pool:
        assert (pool.num_groups, pool.group_size) == (2, 4)
        assert [w.groups for w in pool._workers] == [[(0, 2), (4, 2)], [(2, 2), (6, 2)]]
        ref = _Reference(task, n, seed, pool.env_kwargs)
        obs = pool.reset()
        rng = np.random.default_rng(0)
        acts = {g: rng.integers(pool.num_actions, size=4) for g in (0, 1)}
        pool.send(acts[0], 0)
        pool.send(acts[1], 1)
        ended = 0
        for t in range(240):
            g = t % 2
            obs, r, term, trunc, info = pool.recv(g)
            assert obs["glyphs"].shape == (4, 21, 79) and r.shape == (4,)
            ended += _check_group(ref, g, acts[g], (obs, r, term, trunc, info), f"step {t}")
            acts[g] = rng.integers(pool.num_actions, size=4)
            pool.send(acts[g], g)
        assert ended >= 4
        # step() steps both groups; reset() drops the step still in flight
        pool.recv(0)
        obs = pool.reset()
        obs, r, *_ = pool.step(np.zeros(n, int))
        assert obs["glyphs"].shape == (n, 21, 79) and r.shape == (n,)
        with pytest.raises(RuntimeError, match="no step in flight"):
            pool.recv()
        pool.send(np.zeros(4, int), 1)
        with pytest.raises(RuntimeError, match="already has a step in flight"):
            pool.send(np.zeros(4, int), 1)
        pool.send(np.zeros(4, int), 0)
        with pytest.raises(ValueError, match="was sent first"):
            pool.recv(0)
        pool.recv(1)
        with pytest.raises(ValueError, match="expected 4 actions"):
            pool.send(np.zeros(8, int), 1)
    with pytest.raises(ValueError, match="num_groups"):
        nethack.NLEPool(ROOM, num_envs=6, num_groups=4)
    with pytest.raises(ValueError, match="num_workers"):
        nethack.NLEPool(ROOM, num_envs=4, num_groups=2, num_workers=3)


@pytest.mark.parametrize("num_workers,host_envs", [(1, 1), (0, 4)], ids=["host+worker", "host only"])
def test_host_envs_equal_envs_stepped_one_by_one(num_workers, host_envs):
    """Envs the host steps itself (host_envs per group, the first of each group) give exactly the sequential envs'
    results, pipelined or not, next to the workers' envs; with host_envs = the group size there are no workers."""
    n, seed, task = 8, 5, ROOM
    with nethack.NLEPool(task, num_envs=n, num_workers=num_workers or None, num_groups=2, seed=seed,
                         obs_keys=ALL_KEYS, host_envs=host_envs) as pool:
        assert pool.num_workers == num_workers and pool.host_envs == host_envs
        if num_workers:
            assert [w.groups for w in pool._workers] == [[(1, 3), (5, 3)]]  # envs 0 and 4 are the host's
        ref = _Reference(task, n, seed, pool.env_kwargs)
        obs = pool.reset()
        for i in range(n):
            _check_obs(obs, i, ref.obs[i], f"reset env {i}")
        rng = np.random.default_rng(1)
        acts = {g: rng.integers(pool.num_actions, size=4) for g in (0, 1)}
        pool.send(acts[0], 0)
        pool.send(acts[1], 1)
        ended = 0
        for t in range(200):
            g = t % 2
            ended += _check_group(ref, g, acts[g], pool.recv(g), f"step {t}")
            acts[g] = rng.integers(pool.num_actions, size=4)
            pool.send(acts[g], g)
        assert ended >= 4
        for g in (0, 1):  # the steps still in flight
            _check_group(ref, g, acts[g], pool.recv(g), "last step")
        for t in range(30):  # step(): both groups at once
            a = rng.integers(pool.num_actions, size=n)
            obs, r, term, trunc, info = pool.step(a)
            for i in range(n):
                fin, rr, te, tr, stats = ref.step(i, a[i])
                _check_obs(obs, i, ref.obs[i], f"step() {t} env {i}")
                assert r[i] == pytest.approx(rr, abs=1e-6), (t, i)
        pids, shm, slots = pool.worker_pids, pool.shm_name, list(pool._local_slots)
    assert not any(_alive(p) for p in pids) and not _shm_exists(shm) and pool.closed
    assert not pool._local_slots and all(s.env.unwrapped.nethack._pynethack is None for s in slots)  # envs closed


def test_host_envs_worker_kill_and_host_env_error():
    """With host envs, a killed worker is still restarted (its envs cut, the host's untouched); a host env that
    raises withdraws the step with an error that says what to do, and the pool goes on."""
    with nethack.NLEPool(ROOM, num_envs=4, num_workers=1, seed=0, host_envs=2, step_timeout=HANG_BOUND) as pool:
        pool.reset()
        rng = np.random.default_rng(0)
        for _ in range(3):
            pool.step(rng.integers(8, size=4))
        os.kill(pool.worker_pids[0], signal.SIGKILL)
        with pytest.warns(RuntimeWarning, match="worker 0"):
            obs, r, term, trunc, info = pool.step(rng.integers(8, size=4))
        assert trunc[2:].all() and info["episode_done"][2:].all() and not info["episode_done"][:2].any()
        assert pool.restarts == 1
        slot = pool._local_slots[0]
        slot.step = lambda a: (_ for _ in ()).throw(OSError("nle broke"))
        with pytest.raises(RuntimeError, match="host envs failed.*host_envs=0"):
            pool.step(rng.integers(8, size=4))
        del slot.step  # the class's step again
        obs, r, *_ = pool.step(rng.integers(8, size=4))
        assert obs["glyphs_crop"].shape == (4, 9, 9) and pool.restarts == 1
    with pytest.raises(ValueError, match="host_envs"):
        nethack.NLEPool(ROOM, num_envs=4, num_groups=2, host_envs=3)
    with pytest.raises(ValueError, match="num_workers"):
        nethack.NLEPool(ROOM, num_envs=4, num_groups=2, host_envs=1, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        nethack.NLEPool(ROOM, num_envs=4, host_envs=4, num_workers=1)


@pytest.mark.parametrize("spin", SPINS, ids=lambda s: f"spin={s}")
def test_worker_killed_with_groups_in_flight(spin):
    """A worker dies while both groups are in flight: both groups report its envs' episodes as truncated (with
    the observations last returned) and go on with fresh episodes; the other worker's envs are untouched."""
    with nethack.NLEPool(ROOM, num_envs=8, num_workers=2, num_groups=2, seed=0, step_timeout=HANG_BOUND,
                         spin=spin) as pool:
        pool.reset()
        rng = np.random.default_rng(0)
        last = {}
        for g in (0, 1):
            pool.send(rng.integers(8, size=4), g)
        for t in range(6):
            g = t % 2
            last[g] = pool.recv(g)[0]
            if t < 4:
                pool.send(rng.integers(8, size=4), g)
        old = pool.worker_pids
        _stop(old[1])  # stopped first, so it cannot finish group 0's step before it dies
        pool.send(rng.integers(8, size=4), 0)  # group 0 in flight, group 1 received: both must report the cut
        os.kill(old[1], signal.SIGKILL)  # envs 2, 3 (group 0) and 6, 7 (group 1)
        with pytest.warns(RuntimeWarning, match="worker 1"):
            obs0, r0, term0, trunc0, info0 = pool.recv(0)
        assert trunc0[2:].all() and info0["episode_done"][2:].all() and (r0[2:] == 0).all()
        np.testing.assert_array_equal(info0["final_obs"]["glyphs_crop"][2:], last[0]["glyphs_crop"][2:])
        pool.send(rng.integers(8, size=4), 1)
        obs1, r1, term1, trunc1, info1 = pool.recv(1)
        assert trunc1[2:].all() and info1["episode_done"][2:].all() and (r1[2:] == 0).all()
        np.testing.assert_array_equal(info1["final_obs"]["glyphs_crop"][2:], last[1]["glyphs_crop"][2:])
        assert pool.restarts == 1 and pool.worker_pids[0] == old[0] and not _alive(old[1])
        for t in range(20):  # the run goes on, cuts reported once
            g = t % 2
            pool.send(rng.integers(8, size=4), g)
            *_, trunc, info = pool.recv(g)
            assert info["episode_length"][info["episode_done"]].min(initial=100) >= 1


@pytest.mark.parametrize("env_groups", [1, 2])
def test_pipelined_rollout_replays_exactly(env_groups):
    """A rollout collected with pipelined groups is the [T, N] batch the same envs give when its actions are
    replayed one by one: the groups' steps land in the right rows and columns."""
    import jax
    from agents import ppo, ppo_host
    from envs.nethack import PoolConfig
    cfg = ppo.host_config(env_name=ROOM, num_envs=4, num_steps=110, total_timesteps=4 * 110 * 10)
    pool_cfg = PoolConfig(num_workers=2, env_groups=env_groups)
    pool = pool_cfg.make_pool(ROOM, 4, seed=9)
    try:
        assert pool.num_groups == env_groups
        tr = ppo_host.pool_trainer(cfg, pool, pool_cfg)
        state = tr.init(jax.random.PRNGKey(0))
        traj, last = tr.collect(state.train_state.params, jax.random.PRNGKey(1))
        ref = _Reference(ROOM, 4, 9, pool.env_kwargs)
    finally:
        pool.close()
    assert traj.action.shape == (110, 4) and traj.obs["blstats"].shape == (110, 4, 27)
    for t in range(110):  # Room-5x5 episodes end within 100 steps
        for i in range(4):
            what = f"t {t} env {i}"
            np.testing.assert_array_equal(traj.obs["blstats"][t, i], ref.obs[i]["blstats"], err_msg=what)
            fin, r, te, tr_, _ = ref.step(i, traj.action[t, i])
            np.testing.assert_array_equal(traj.final_obs["blstats"][t, i], fin["blstats"], err_msg=what)
            np.testing.assert_array_equal(traj.final_obs["message"][t, i], fin["message"], err_msg=what)
            assert traj.reward[t, i] == pytest.approx(r, abs=1e-6) and traj.terminated[t, i] == te, what
            assert traj.truncated[t, i] == tr_, what
    for i in range(4):
        np.testing.assert_array_equal(last["blstats"][i], ref.obs[i]["blstats"])
    assert (traj.terminated | traj.truncated).any(axis=0).all()


def test_worker_dead_at_send_is_restarted_once():
    """A worker already dead when group 1 is sent (the send fails) and noticed at group 0's recv is restarted
    once: group 1's recv reports its envs as cut, not a second failure of the new worker."""
    with nethack.NLEPool(ROOM, num_envs=8, num_workers=2, num_groups=2, seed=0, step_timeout=HANG_BOUND) as pool:
        pool.reset()
        rng = np.random.default_rng(0)
        old = pool.worker_pids
        _stop(old[1])  # stopped first, so it cannot finish group 0's step before it dies
        pool.send(rng.integers(8, size=4), 0)
        os.kill(old[1], signal.SIGKILL)
        assert _wait_until(lambda: pool._workers[1].proc.poll() is not None)
        pool.send(rng.integers(8, size=4), 1)
        assert [w.index for w, _ in pool._send_failed[1]] == [1]  # its socket is closed: the send failed
        with pytest.warns(RuntimeWarning, match="worker 1"):
            *_, trunc0, _ = pool.recv(0)
        *_, trunc1, info1 = pool.recv(1)
        assert trunc0[2:].all() and trunc1[2:].all() and info1["episode_done"][2:].all()
        assert pool.restarts == 1 and _alive(pool.worker_pids[1])


def test_pool_stats_and_spec_for_host_loop():
    from envs.host import host_spec
    with nethack.NLEPool(ROOM, num_envs=3, num_workers=1, seed=0) as pool:
        spec = host_spec(pool)
        assert spec.obs_shape == {"glyphs_crop": (9, 9), "blstats": (27,), "message": (256,)}
        assert spec.num_actions == pool.num_actions == 8 and pool.has_success
        pool.reset()
        rng = np.random.default_rng(1)
        lengths = []
        for _ in range(120):
            *_, info = pool.step(rng.integers(8, size=3))
            lengths += list(info["episode_length"][info["episode_done"]])
            assert set(info) >= {"final_obs", "episode_done", "episode_return", "episode_length",
                                 "episode_depth", "episode_score", "episode_success"}
            assert all(v.shape == (3,) for k, v in info.items() if k != "final_obs")
        assert lengths and max(lengths) <= 100  # MiniHack Room's step limit
        with pytest.raises(ValueError, match="actions"):
            pool.step(np.array([0, 1, 99]))


@pytest.mark.parametrize("spin", SPINS, ids=lambda s: f"spin={s}")
def test_worker_kill_and_hang_recovery(spin):
    # step_timeout only bounds a hang here: a healthy worker on a busy machine never comes near it (a dead worker
    # is noticed from its closed socket, not by the clock); the hang below shortens it once the healthy worker
    # has answered
    with nethack.NLEPool(ROOM, num_envs=4, num_workers=2, seed=0, step_timeout=HANG_BOUND, spin=spin) as pool:
        pool.reset()
        rng = np.random.default_rng(0)
        for _ in range(3):
            obs, *_ = pool.step(rng.integers(8, size=4))
        old = pool.worker_pids
        os.kill(old[0], signal.SIGKILL)
        with pytest.warns(RuntimeWarning, match="worker 0"):
            obs2, r, term, trunc, info = pool.step(rng.integers(8, size=4))
        assert trunc[:2].all() and not term[:2].any() and (r[:2] == 0).all()
        assert info["episode_done"][:2].all() and (info["episode_length"][:2] >= 3).all()
        np.testing.assert_array_equal(info["final_obs"]["glyphs_crop"][:2], obs["glyphs_crop"][:2])
        new = pool.worker_pids
        assert new[0] != old[0] and new[1] == old[1] and _alive(new[0]) and not _alive(old[0])
        assert pool.restarts == 1
        # a hung worker (stopped) is noticed after step_timeout and replaced too. The healthy worker's answer is
        # waited for first (its done counter reaches the step's sequence number), so however slow this machine is
        # only the stopped worker can miss the (then short) step_timeout
        _stop(new[1])
        pool.send(rng.integers(8, size=4))
        w0 = pool._workers[0]
        assert _wait_until(lambda: pool._v["ctl/seq"][0][W.DONE_SEQ] >= w0.seq, timeout=HANG_BOUND)
        pool.step_timeout = 0.5
        with pytest.warns(RuntimeWarning, match="worker 1 .*did not answer"):
            *_, trunc, info = pool.recv()
        pool.step_timeout = HANG_BOUND
        assert trunc[2:].all() and not trunc[:2].any() and pool.restarts == 2 and not _alive(new[1])
        assert pool.worker_pids[0] == new[0]  # the healthy worker was not counted as hung
        for _ in range(30):  # the run goes on
            *_, info = pool.step(rng.integers(8, size=4))
        pids = pool.worker_pids
    assert not any(_alive(p) for p in pids)


def test_close_frees_processes_and_shared_memory():
    pool, _ = envs.make(ROOM, num_envs=2, num_workers=2)
    pids, shm = pool.worker_pids, pool.shm_name
    pool.reset()
    pool.step(np.zeros(2, int))
    assert all(_alive(p) for p in pids) and _shm_exists(shm)
    pool.close()
    pool.close()  # idempotent
    assert not any(_alive(p) for p in pids) and not _shm_exists(shm)
    with pytest.raises(RuntimeError, match="closed"):
        pool.step(np.zeros(2, int))


@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_cleanup_after_host_crash(how):
    code = textwrap.dedent(f"""
        import json, os, signal, sys, types
        sys.path.insert(0, {os.getcwd()!r})
        # the pool without envs/__init__ (which imports gymnax and JAX: seconds of start-up)
        pkg = types.ModuleType("envs")
        pkg.__path__ = [os.path.join({os.getcwd()!r}, "envs")]
        sys.modules["envs"] = pkg
        from envs import nethack
        pool = nethack.NLEPool({ROOM!r}, num_envs=2, num_workers=2)
        pool.reset()
        print(json.dumps({{"pids": pool.worker_pids, "shm": pool.shm_name}}), flush=True)
        if {how!r} == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("crash")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert _wait_until(lambda: not any(_alive(p) for p in info["pids"])), "worker processes leaked"
    assert _wait_until(lambda: not _shm_exists(info["shm"])), "shared memory segment leaked"


def test_missing_nle_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nle", None)  # "import nle" now raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[nle\]"'):
        envs.make("NetHackScore-v0", num_envs=2)


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="Did you mean"):
        envs.make("MiniHack-Room-5x5-v9", num_envs=1)
    with pytest.raises(ValueError, match="obs_keys"):
        envs.make(ROOM, num_envs=1, obs_keys=("pixels",))
    with pytest.raises(ValueError, match="num_workers"):
        envs.make(ROOM, num_envs=2, num_workers=3)
    with pytest.raises(nethack.WorkerError, match="failed to start"):
        envs.make(ROOM, num_envs=1, env_kwargs={"no_such_option": 1})
    assert "NetHackScore-v0" in envs.registered() and ROOM in envs.registered()


def test_host_envs_option_auto_and_errors(monkeypatch):
    """--host-envs -1 (the default) gives 3/8 of each group to the host (at least 1, at most all but one) on a
    machine of <= 2 cores unless --num-workers is given, else 0; bad values name the field and the fix."""
    from envs.nethack import PoolConfig
    from jaxrl_pref.config import ConfigError
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert PoolConfig().resolved_host_envs(16) == 3  # 16 envs, 2 groups
    assert PoolConfig().resolved_host_envs(32) == 6
    assert PoolConfig().resolved_host_envs(4) == 1  # a worker keeps one env per group
    assert PoolConfig().resolved_host_envs(2) == 0  # one env per group: all in the worker
    assert PoolConfig(num_workers=2).resolved_host_envs(16) == 0
    assert PoolConfig(host_envs=3).resolved_host_envs(16) == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert PoolConfig().resolved_host_envs(16) == 0
    with pytest.raises(ConfigError, match="host_envs.*--host-envs"):
        PoolConfig(host_envs=9).check(16)  # 8 envs per group
    with pytest.raises(ConfigError, match="num_workers"):
        PoolConfig(host_envs=8, num_workers=1).check(16)
    with pytest.raises(ConfigError, match="num_workers"):
        PoolConfig(host_envs=6, num_workers=3).check(16)


def test_cli_trains_and_checkpoints(tmp_path):
    """Same runner as Anakin: config.json, metrics, checkpoints; a finished run dir refuses a new run."""
    from experiments import ppo_nethack
    run = tmp_path / "run"
    args = ["--env", ROOM, "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
            "--total-timesteps", "192", "--checkpoint-every", "2", "--log-every", "1", "--run-dir", str(run),
            "--progress", "False"]
    assert ppo_nethack.main(args) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "episode_return" in json.dumps(rows[0])
    saved = json.loads((run / "config.json").read_text())
    assert saved["agent"] == "ppo_nethack" and saved["config"]["env_name"] == ROOM
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert ppo_nethack.main(args) == 2  # the run dir holds checkpoints: refused with a message
    with pytest.raises(SystemExit) as e:  # JAX envs are not host envs: the option is named
        ppo_nethack.parse(["--env", "CartPole-v1"])
    assert e.value.code == 2


@pytest.mark.slow
@pytest.mark.run_bound
def test_stopped_run_resumes_from_cli(tmp_path):
    import jax
    from agents import ppo_host
    from experiments import ppo_nethack
    from jaxrl_pref.runner import run_experiment
    run = tmp_path / "run"
    opts = ppo_nethack.parse(["--env", ROOM, "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
                              "--total-timesteps", "256"])
    pool = opts.pool.make_pool(ROOM, 4, seed=0)
    try:  # stops (saved, resumable) after 2 of its 4 updates
        make = lambda _, log_fn=None, log_every=1: ppo_host.pool_trainer(  # noqa: E731
            opts.ppo, pool, opts.pool, opts.net, log_fn=log_fn, log_every=log_every)
        spec = dict(run_dir=run, num_updates=4, steps_per_update=64, checkpoint_every=2, log_every=1,
                    progress=False, agent="ppo_nethack")
        res = run_experiment(make, opts.config, stop_after=2, **spec)
        assert res.updates_done == 2 and not res.finished
        # the learner is restored exactly (docs/running.md; the games start fresh): resumed and stopped at once,
        # the state is bit for bit the one the run stopped with -- parameters, optimiser, PRNG key, update count
        back = run_experiment(make, opts.config, stop_after=2, resume=True, **spec)
    finally:
        pool.close()
    assert back.resumed_from == 2 and back.updates_done == 2

    def bits(tree):
        return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]
    assert bits(back.state) == bits(res.state)
    assert (np.asarray(back.state.update_step) == 2).all() and jax.tree.leaves(back.state.train_state.params)
    before = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert ppo_nethack.main(["--resume", str(run), "--progress", "False"]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(before) == 2 and len(rows) == 4
    assert rows[:2] == before  # the restored history, untouched; updates 3 and 4 trained from there
    assert max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("env_groups", [1, 2])
@pytest.mark.run_bound
def test_ppo_learns_minihack_room_beats_random(env_groups):
    """Room-5x5: random play reaches the goal in ~55% of its 100-step episodes (mean return ~0.35); after
    20 updates (10k steps) PPO's episodes end at the goal quickly, with or without pipelined env groups.
    Margin: +0.4 over random. The random return is NLE's integer game with fixed seeds (0.345 on every machine);
    PPO's final return is not (float order), but measured (``python -m benchmarks.learning_spread --task
    minihack_room_g1`` / ``_g2``, 2026-12-02) it ends at 0.991-1.000 on each of 8 seeds with one env group and
    0.993-0.998 with two (std 0.003), so the bound (0.345 + 0.4 = 0.745 here) is 0.25 below the worst seed."""
    import jax
    from agents import ppo, ppo_host
    from envs.nethack import PoolConfig
    from envs.nethack import random_policy_return
    random_return = random_policy_return(ROOM)
    cfg = ppo.host_config(env_name=ROOM, num_envs=16, num_steps=32, total_timesteps=16 * 32 * 20,
                          learning_rate=1e-3, update_epochs=4)
    pool_cfg = PoolConfig(env_groups=env_groups)
    pool = pool_cfg.make_pool(ROOM, 16, seed=0)
    try:
        tr = ppo_host.pool_trainer(cfg, pool, pool_cfg)
        state, m = tr.run(tr.init(jax.random.PRNGKey(0)), None, cfg.num_updates)
    finally:
        pool.close()
    final = float(np.nanmean(m["episode_return"][-5:]))
    print(f"MiniHack-Room-5x5: random mean return {random_return:.3f}, PPO (last 5 of 20 updates) {final:.3f}")
    assert final > random_return + 0.4, (final, random_return)


@pytest.mark.parametrize("spin", SPINS, ids=lambda s: f"spin={s}")
def test_worker_error_reaches_the_host_with_its_traceback(spin):
    """A command that fails in a worker comes back as that worker's failure with the worker's traceback, and the
    worker (and the other one) go on serving commands in order."""
    with nethack.NLEPool(ROOM, num_envs=2, num_workers=2, seed=0, spin=spin) as pool:
        pool.reset()
        failed = pool._wait(pool._send(200, pool._workers[:1]))  # no such command
        assert [w.index for w, _ in failed] == [0]
        assert "raised an error" in failed[0][1] and "unknown command 200" in failed[0][1]
        for _ in range(5):  # both workers still answer, nothing left over in either direction
            *_, info = pool.step(np.zeros(2, np.int64))
        assert pool.restarts == 0 and all(_alive(p) for p in pool.worker_pids)
