"""Seed spread of the learning tests: the statistic each one asserts, measured over many seeds (every learning test
of the slow suite, and the default suite's host-loop CartPole and ONI retrieval).

    python -m benchmarks.learning_spread --task xminigrid_door_key --set-size 16 --first-set 1   # 16 more seeds
    python -m benchmarks.learning_spread --task cartpole --sets 2          # 2 seed sets of the test's size
    python -m benchmarks.learning_spread --summary                         # every recorded task (runs nothing)
    python -m benchmarks.learning_spread --summary --task pendulum

Fixed seeds do not fix a trajectory across machines: float summation order differs between CPUs (and between
batched and unbatched kernels), so a run that learns here at seed 3 can fail there at seed 3 (issue 18: DoorKey
seed 3 returned 0.667 on another 2-core machine). A different seed set stands in for another machine's float order.
So each learning test asserts a statistic over its seeds (a mean or median, or k of n seeds) with a bound taken
from the spread measured here, and states the numbers in its docstring.

Each task mirrors one test (keep the configs in sync with ``tests/``; ``TESTS`` holds each test's seed count and
checks). Seed set ``s`` of ``n`` seeds is ``jax.random.split(jax.random.PRNGKey(s), n)`` for the in-jit trainers
(one vmapped program per set; set 0 = the tests' own keys) and seeds ``n*s .. n*s+n-1`` for host loops. Every set's
per-seed values go to ``benchmarks/learning_spread.jsonl`` (task, set, seeds, values, wall time, date, host, code).
``--summary`` prints per task the per-seed mean/std/min/max over all recorded seeds, then for each check of the
test: its value per recorded set and over 4000 sets of the test's size drawn from all recorded seeds (mean, std,
mean -/+ 3 std, worst, how often the bound fails), for k-of-n, median, min and max checks the binomial failure
probability at the per-seed miss rate (misses + 1) / (N + 2) (min/max: every seed must pass), and for mean/min/max
checks a normal tail (how many standard deviations of the check's value the bound lies from its mean).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from jaxrl_pref.runner import use_sync_cpu_dispatch

use_sync_cpu_dispatch()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrl_pref.stats import best_window_mean, final_score  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path(__file__).with_suffix(".jsonl")


def _commit() -> str:
    """The commit measured (``+`` if the tree differs from it), or "" outside a git checkout."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+" if head and dirty else "")


def _keys(s: int, n: int):
    return jax.random.split(jax.random.PRNGKey(s), n)


# -- tasks: each returns {statistic: per-seed values} for one seed set ------------------------------------------------

def cartpole(s: int, n: int) -> dict:
    """tests/test_ppo.py::test_cartpole_reaches_475_for_7_of_8_seeds: default config, mean return of the last 10
    updates per seed."""
    from agents import ppo
    out = jax.jit(jax.vmap(ppo.make_train(ppo.Config())))(_keys(s, n))
    return {"final": final_score(out.metrics["episode_return"], last=10)}


def pendulum(s: int, n: int) -> dict:
    """tests/test_ppo.py::test_pendulum_continuous_actions_learn."""
    from agents import ppo
    cfg = ppo.Config(env_name="Pendulum-v1", num_envs=4, num_steps=1024, total_timesteps=200_000,
                     learning_rate=3e-4, update_epochs=10, num_minibatches=64, gamma=0.9, ent_coef=0.0,
                     normalize_obs=True, normalize_reward=True)
    out = jax.jit(jax.vmap(ppo.make_train(cfg)))(_keys(s, n))
    ret = np.asarray(out.metrics["episode_return"])
    final = final_score(ret, last=3)
    return {"final": final, "gain": final - ret[:, 0]}


def xminigrid_door_key(s: int, n: int) -> dict:
    """tests/test_sparse.py::test_ppo_learns_xminigrid_door_key_5x5: mean return / success of the last 5 updates."""
    from agents import ppo
    cfg = ppo.Config(env_name="MiniGrid-DoorKey-5x5", num_envs=32, num_steps=64, total_timesteps=32 * 64 * 60,
                     learning_rate=3e-4, update_epochs=8, num_minibatches=8)
    out = jax.jit(jax.vmap(ppo.make_train(cfg)))(_keys(s, n))
    return {"return": final_score(out.metrics["episode_return"], last=5),
            "success": final_score(out.metrics["episode_success"], last=5)}


MEMORY = dict(env_name="MemoryChain-10", num_envs=16, num_steps=64, total_timesteps=16 * 64 * 100, hidden=(64,),
              rnn_hidden=64, activation="relu", update_epochs=4, num_minibatches=4, learning_rate=1e-3,
              ent_coef=0.01)


def _memory_chain(s: int, n: int, network: str) -> dict:
    """tests/test_recurrent.py::test_memory_task_needs_a_recurrent_policy: MemoryChain-10 (the cue is shown at the
    first step only, the answer is asked 10 steps later), 100 updates of 16 envs x 64 steps; success rate of the
    last 10 updates per seed."""
    from agents import ppo
    out = jax.jit(jax.vmap(ppo.make_train(ppo.Config(**MEMORY, network=network))))(_keys(s, n))
    return {"success": final_score(out.metrics["episode_success"], last=10)}


def memory_chain_mlp(s: int, n: int) -> dict:
    return _memory_chain(s, n, "mlp")


def memory_chain_gru(s: int, n: int) -> dict:
    return _memory_chain(s, n, "gru")


def memory_chain_lstm(s: int, n: int) -> dict:
    return _memory_chain(s, n, "lstm")


KEYDOOR = dict(env_name="KeyDoor-9", num_envs=32, num_steps=64, total_timesteps=600_000)


def _keydoor9(s: int, n: int, bonus: str) -> dict:
    """tests/test_bonus.py::test_e3b_solves_keydoor_where_ppo_does_not (slow): KeyDoor-9, 146 updates of 32 envs x
    64 steps, PPO with or without E3B (coefficient 0.01); success rate of the last 15 updates per seed."""
    from agents import ppo
    from jaxrl_pref.rewards.bonus import BonusConfig, with_bonus
    cfg = ppo.Config(**KEYDOOR)
    reward = with_bonus(None, BonusConfig(bonus=bonus, bonus_coef=0.01), cfg.num_envs)
    out = jax.jit(jax.vmap(ppo.make_train(cfg, reward=reward)))(_keys(s, n))
    return {"success": final_score(out.metrics["episode_success"], last=15)}


def keydoor9_ppo(s: int, n: int) -> dict:
    return _keydoor9(s, n, "none")


def keydoor9_e3b(s: int, n: int) -> dict:
    return _keydoor9(s, n, "e3b")


def _deepsea10(s: int, n: int, bonus: str) -> dict:
    """tests/test_bonus.py::test_e3b_solves_deep_sea_where_ppo_does_not (slow): DeepSea-10, 146 updates of 32 envs x
    64 steps, PPO with or without E3B (0.01), as experiments.sparse_study's deepsea10; success of the last 15
    updates per seed."""
    from agents import ppo
    from jaxrl_pref.rewards.bonus import BonusConfig, with_bonus
    cfg = ppo.Config(env_name="DeepSea-10", num_envs=32, num_steps=64, total_timesteps=300_000)
    reward = with_bonus(None, BonusConfig(bonus=bonus, bonus_coef=0.01), cfg.num_envs)
    out = jax.jit(jax.vmap(ppo.make_train(cfg, reward=reward)))(_keys(s, n))
    return {"success": final_score(out.metrics["episode_success"], last=15)}


def deepsea10_ppo(s: int, n: int) -> dict:
    return _deepsea10(s, n, "none")


def deepsea10_e3b(s: int, n: int) -> dict:
    return _deepsea10(s, n, "e3b")


def cartpole_gru(s: int, n: int) -> dict:
    """tests/test_recurrent.py::test_gru_cartpole_reaches_475 (slow): the anchor bench's GRU config, 500k steps;
    mean return of the last 10 updates per seed."""
    from agents import ppo
    from jaxrl_pref.testing import RNN_BENCH
    out = jax.jit(jax.vmap(ppo.make_train(ppo.Config(**RNN_BENCH, network="gru"))))(_keys(s, n))
    ret = out.metrics["episode_return"]
    return {"final": final_score(ret, last=10), "peak": best_window_mean(ret, 10)}


def acrobot_gru(s: int, n: int) -> dict:
    """tests/test_recurrent.py::test_gru_acrobot_learns_with_the_truncation_bootstrap (nightly): the anchor bench's
    GRU config on Acrobot-v1 with the defaults (truncation bootstrapped, detached critic), 500k steps; mean return of
    the last 10 updates per seed."""
    from agents import ppo
    from jaxrl_pref.testing import RNN_BENCH
    out = jax.jit(jax.vmap(ppo.make_train(ppo.Config(**{**RNN_BENCH, "env_name": "Acrobot-v1"}, network="gru"))))(
        _keys(s, n))
    return {"final": final_score(out.metrics["episode_return"], last=10)}


def heron_pendulum(s: int, n: int) -> dict:
    """tests/test_heron.py::test_heron_learns_pendulum: first-10-updates mean and final score per seed."""
    from agents import heron
    from agents.heron import task_config
    out = jax.jit(jax.vmap(heron.make_train(task_config("pendulum", 300_000))))(_keys(s, n))
    ret = np.asarray(out.metrics["episode_return"])
    return {"first": np.nanmean(ret[:, :10], axis=1), "final": final_score(ret, frac=0.1, rounding="round")}


def rnd_novelty(s: int, n: int) -> dict:
    """tests/test_rnd.py::test_seen_observations_pay_less_than_new_ones: per seed (init, data and update keys from
    one key), the seen observations' bonus after 61 updates over the first one's (``after/first``) and the novel
    observations' bonus over the seen ones' (``new/after``)."""
    from jaxrl_pref.rewards.rnd import RND
    from jaxrl_pref.testing import obs_batch, obs_spec
    rnd = RND(hidden=(32, 32), features=16, learning_rate=1e-3, steps=4)

    def run(key):
        k_init, k_seen, k_novel, k_upd = jax.random.split(key, 4)
        state = rnd.init(k_init, obs_spec((6,)))
        seen = jax.random.normal(k_seen, (16, 8, 6)) * 0.3 + 1.0
        novel = jax.random.normal(k_novel, (16, 8, 6)) * 0.3 - 1.0
        state, _ = rnd.update(state, obs_batch(seen), k_upd)
        first = rnd(state, obs_batch(seen))[0].mean()
        state = jax.lax.scan(lambda st, i: rnd.update(st, obs_batch(seen), jax.random.fold_in(k_upd, i)), state,
                             jnp.arange(60))[0]
        after, new = rnd(state, obs_batch(seen))[0].mean(), rnd(state, obs_batch(novel))[0].mean()
        return after / first, new / after
    fall, novelty = jax.jit(jax.vmap(run))(_keys(s, n))
    return {"after/first": np.asarray(fall), "new/after": np.asarray(novelty)}


def e3b_inverse(s: int, n: int) -> dict:
    """tests/test_e3b.py::test_inverse_dynamics_embedding_learns_the_action: the inverse model's accuracy at the
    first and the 40th update per seed."""
    from jaxrl_pref.testing import e3b_inverse_accuracies
    accs = e3b_inverse_accuracies(_keys(s, n))
    return {"first": accs[:, 0], "last": accs[:, -1]}


def oni_classifier(s: int, n: int) -> dict:
    """tests/test_oni.py::test_classifier_generalises_to_held_out_messages: training accuracy and held-out accuracy
    (24 messages of 5 monsters and 3 items never trained on) per seed (init and update keys from one key)."""
    from jaxrl_pref.rewards.classification import Classification
    from envs.messages import encode_messages
    from jaxrl_pref.testing import ITEMS, MONSTERS, classification_messages
    train_x, train_y = classification_messages(MONSTERS[:11], ITEMS[:7])
    test_x, test_y = classification_messages(MONSTERS[11:], ITEMS[7:])
    model = Classification(capacity=256, steps=150, batch_size=64, learning_rate=2e-2)
    data, test_msgs = model.buffer_from(encode_messages(train_x), train_y), jnp.asarray(encode_messages(test_x))

    def run(key):
        k_init, k_upd = jax.random.split(key)
        state, m = model.update({**model.init(k_init), "data": data}, k_upd)
        acc = ((model.prob(state, test_msgs) > 0.5) == (jnp.asarray(test_y) > 0.5)).mean()
        return m["reward_model/train_acc"], acc
    train_acc, acc = jax.jit(jax.vmap(run))(_keys(s, n))
    return {"train_acc": np.asarray(train_acc), "held_out_acc": np.asarray(acc)}


def random_success(s: int, n: int) -> dict:
    """tests/test_sparse.py::test_tasks_jittable_with_success on DeepSea/KeyDoor: uniformly random play, 256 envs x
    64 steps per seed (reset and action keys from one key, not the test's own PRNGKey(0)/(1)); per task the
    successes and the ended episodes per seed."""
    import envs
    from envs import sparse
    from jaxrl_pref.rollout import collect
    out = {}
    for name in [f"DeepSea-{k}" for k in sparse.SIZES] + [f"KeyDoor-{k}" for k in sparse.SIZES_KD]:
        env, p = envs.make(name, num_envs=256)
        num_actions = envs.spec(env, p).num_actions

        def one(key, env=env, p=p, num_actions=num_actions):
            k_reset, k_act = jax.random.split(key)
            pol = lambda o, k: (jax.random.randint(k, (256,), 0, num_actions), jnp.zeros(256), jnp.zeros(256))  # noqa
            obs, st = env.reset(k_reset, p)
            tr = collect(env, p, pol, st, obs, k_act, 64, keep_info=("episode_success",))[2]
            return tr.info["episode_success"].sum(), tr.done.sum()
        succ, eps = jax.jit(lambda ks: jax.lax.map(one, ks))(_keys(s, n))  # one seed at a time: bounded memory
        out[f"{name}/successes"], out[f"{name}/episodes"] = np.asarray(succ), np.asarray(eps)
    return out


def oni_captioned_key(s: int, n: int) -> dict:
    """tests/test_oni_captioned.py::test_labelling_a_caption_helpful_makes_the_agent_produce_it_more: "You pick up
    the key." per ended episode over the last quarter of 120 updates, with that caption labelled helpful and with
    every caption labelled 0 (the test's former control: bimodal, not asserted), seeds n*s .. n*s+n-1 vmapped
    (run_experiment: PRNGKey(seed + i)). The test's control is ``oni_captioned_locked``."""
    import tempfile
    from agents.testing import KEY, caption_key_rate
    from envs import captions
    texts = [x for x in captions.caption_table("KeyDoor-5").texts if x]
    with tempfile.TemporaryDirectory() as d:
        helpful = caption_key_rate(Path(d) / "helpful", {**{x: 0.0 for x in texts}, KEY: 1.0}, seeds=n, seed=n * s)
        none = caption_key_rate(Path(d) / "none", {x: 0.0 for x in texts}, seeds=n, seed=n * s)
    return {"helpful": np.asarray(helpful), "none": np.asarray(none), "diff": np.asarray(helpful) - np.asarray(none)}


LOCKED = "This door is locked."


def oni_captioned_locked(s: int, n: int) -> dict:
    """The same with "This door is locked." labelled helpful instead (every other caption 0): "You pick up the key."
    per ended episode (holding the key opens the door, which then no longer answers "locked")."""
    import tempfile
    from agents.testing import caption_key_rate
    from envs import captions
    texts = [x for x in captions.caption_table("KeyDoor-5").texts if x]
    with tempfile.TemporaryDirectory() as d:
        locked = caption_key_rate(Path(d) / "locked", {**{x: 0.0 for x in texts}, LOCKED: 1.0}, seeds=n, seed=n * s)
    return {"locked": np.asarray(locked)}


def sqirl_deep_sea(s: int, n: int) -> dict:
    """tests/test_sqirl.py::test_learns_deep_sea_5_at_fixed_seeds: greedy success after the last timestep."""
    from agents import sqirl
    cfg = sqirl.Config(env_name="DeepSea-5", episodes_per_timestep=128, planning_depth=2, eval_episodes=4)
    out = jax.jit(jax.vmap(sqirl.make_train(cfg)))(_keys(s, n))
    return {"success": np.asarray(out.metrics["episode_success"])[:, -1],
            "explore_success": np.asarray(out.metrics["explore/episode_success"])[:, 0]}


def sqirl_deep_sea4(s: int, n: int) -> dict:
    """The host-loop test's config (DeepSea-4, 64 episodes per timestep) in jit: its failure rate, for comparison."""
    from agents import sqirl
    cfg = sqirl.Config(env_name="DeepSea-4", episodes_per_timestep=64, planning_depth=2, eval_episodes=4)
    out = jax.jit(jax.vmap(sqirl.make_train(cfg)))(_keys(s, n))
    return {"success": np.asarray(out.metrics["episode_success"])[:, -1]}


def sqirl_deep_sea4_128(s: int, n: int) -> dict:
    """DeepSea-4 with 128 episodes per timestep in jit."""
    from agents import sqirl
    cfg = sqirl.Config(env_name="DeepSea-4", episodes_per_timestep=128, planning_depth=2, eval_episodes=4)
    out = jax.jit(jax.vmap(sqirl.make_train(cfg)))(_keys(s, n))
    return {"success": np.asarray(out.metrics["episode_success"])[:, -1]}


def sqirl_chain(s: int, n: int) -> dict:
    """tests/test_sqirl.py::test_planning_depth_on_chain...: final greedy return per (k, gamma) setting."""
    from agents import sqirl
    from jaxrl_pref.testing import register_chain
    register_chain()  # TestChain-v0
    big = sqirl.Config(env_name="TestChain-v0", planning_depth=3, gamma=0.9, episodes_per_timestep=64,
                       eval_episodes=4, hidden=(16,), n_epochs=256, learning_rate=1e-2)
    hp = sqirl.hparams(big, planning_depth=jnp.array([1, 3, 1]), gamma=jnp.array([0.9, 0.9, 0.0]))
    train = sqirl.make_train(big)
    out = jax.jit(jax.vmap(lambda k: jax.vmap(train, in_axes=(None, 0))(k, hp)))(_keys(s, n))
    ret = np.asarray(out.metrics["episode_return"])[:, :, -1]  # [seeds, settings]
    return {"k1_gamma0.9": ret[:, 0], "k3": ret[:, 1], "k1_gamma0": ret[:, 2]}


def sqirl_host_deep_sea(s: int, n: int, episodes: int = 64) -> dict:
    """tests/test_sqirl.py::test_host_env_loop_uses_the_same_learner as it was: DeepSea-4 through JaxHostEnv,
    64 episodes per timestep (misses ~1 run in 5, as the same config in jit: ``sqirl_deep_sea4``)."""
    from agents import sqirl
    from envs.host import JaxHostEnv
    cfg = sqirl.Config(env_name="DeepSea-4", episodes_per_timestep=episodes, planning_depth=2, eval_episodes=4)
    succ = []
    for seed in range(n * s, n * s + n):
        tr = sqirl.HostTrainer(cfg, JaxHostEnv("DeepSea-4", episodes, seed=seed), horizon=4)
        _, m = tr.run(tr.init(jax.random.PRNGKey(seed)), None, 4)
        succ.append(float(m["episode_success"][-1]))
    return {"success": np.array(succ)}


def sqirl_host_deep_sea128(s: int, n: int) -> dict:
    """tests/test_sqirl.py::test_host_env_loop_uses_the_same_learner: 128 episodes per timestep."""
    return sqirl_host_deep_sea(s, n, 128)


def _sebulba_cartpole(s: int, n: int, overlap: bool) -> dict:
    """tests/test_sebulba.py::test_host_loop_learns_cartpole (default suite): PPO's host loop on CartPole behind
    JaxHostEnv, 100 updates of 8 envs x 64 steps; mean return of the last 10 updates. Seed i: env seed i,
    PRNGKey(i) (the test: env seed 1, key 0)."""
    import flax.linen as nn
    from agents import ppo, ppo_host
    from envs.host import JaxHostEnv
    from jaxrl_pref.networks import MLP, EncoderActorCritic

    class DictMLP(nn.Module):
        @nn.compact
        def __call__(self, obs):
            return MLP((64, 64))(obs["obs"])
    final = []
    for seed in range(n * s, n * s + n):
        cfg = ppo.Config(env_name="CartPole-v1", num_envs=8, num_steps=64, learning_rate=1e-3,
                         total_timesteps=8 * 64 * 100)
        tr = ppo_host.HostTrainer(cfg, JaxHostEnv("CartPole-v1", 8, seed=seed),
                                  network=EncoderActorCritic(2, DictMLP()), overlap=overlap)
        _, m = tr.run(tr.init(jax.random.PRNGKey(seed)), None, cfg.num_updates)
        final.append(float(final_score(m["episode_return"], last=10)))
    return {"final": np.array(final)}


def sebulba_cartpole(s: int, n: int) -> dict:
    return _sebulba_cartpole(s, n, False)


def sebulba_cartpole_overlap(s: int, n: int) -> dict:
    return _sebulba_cartpole(s, n, True)


KEYROOM_STEPS = 100_000


def _keyroom(s: int, n: int, bonus: str) -> dict:
    """tests/test_bonus.py::test_e3b_solves_minihack_keyroom_where_ppo_does_not (slow): MiniHack-KeyRoom-Fixed-S5
    through the pool, ``python -m experiments.ppo`` with the pool's PPO defaults (as experiments.sparse_study's
    minihack_keyroom) for KEYROOM_STEPS env steps, with or without the bonus (coefficient 0.01), seeds
    n*s .. n*s+n-1; success of the episodes that ended in the last tenth of the updates. Each run is the command
    (a child process, as in the test), read back from its metrics.csv."""
    import subprocess
    import tempfile
    from jaxrl_pref.logging import read_metrics
    out = []
    for seed in range(n * s, n * s + n):
        with tempfile.TemporaryDirectory() as d:
            argv = ["--env", "MiniHack-KeyRoom-Fixed-S5-v0", "--total-timesteps", str(KEYROOM_STEPS), "--seed",
                    str(seed), "--progress", "False", "--run-dir", d]
            if bonus != "none":
                argv += ["--bonus", bonus, "--bonus-coef", "0.01"]
            p = subprocess.run([sys.executable, "-m", "experiments.ppo", *argv], cwd=ROOT, capture_output=True,
                               text=True)
            if p.returncode != 0:
                raise RuntimeError(f"keyroom seed {seed} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
            m = read_metrics(Path(d) / "metrics.csv")
        out.append(float(final_score(m["episode_success"][0], frac=0.1, episodes=m["episodes"][0])))
    return {"success": np.array(out)}


def keyroom_ppo(s: int, n: int) -> dict:
    return _keyroom(s, n, "none")


def keyroom_e3b(s: int, n: int) -> dict:
    return _keyroom(s, n, "e3b")


def keyroom_rnd(s: int, n: int) -> dict:
    return _keyroom(s, n, "rnd")


def _minihack(s: int, n: int, env_groups: int, network: str = "mlp") -> dict:
    """tests/test_nethack.py::test_ppo_learns_minihack_room_beats_random (and with network="lstm"
    tests/test_recurrent.py::test_lstm_policy_learns_minihack_room): final return minus random return."""
    from agents import ppo, ppo_host
    from envs.nethack import PoolConfig, random_policy_return
    room = "MiniHack-Room-5x5-v0"
    out = {"final": [], "random": []}
    for seed in range(n * s, n * s + n):
        out["random"].append(random_policy_return(room, seed=100 + seed, action_seed=seed))
        cfg = ppo.host_config(env_name=room, num_envs=16, num_steps=32, total_timesteps=16 * 32 * 20,
                              learning_rate=1e-3, update_epochs=4, network=network)
        pool_cfg = PoolConfig(env_groups=env_groups)
        pool = pool_cfg.make_pool(room, 16, seed=seed)
        try:
            tr = ppo_host.pool_trainer(cfg, pool, pool_cfg)
            _, m = tr.run(tr.init(jax.random.PRNGKey(seed)), None, cfg.num_updates)
        finally:
            pool.close()
        out["final"].append(float(final_score(m["episode_return"], last=5)))
    out = {k: np.array(v) for k, v in out.items()}
    out["margin"] = out["final"] - out["random"]
    return out


def minihack_room_g1(s: int, n: int) -> dict:
    return _minihack(s, n, 1)


def minihack_room_g2(s: int, n: int) -> dict:
    return _minihack(s, n, 2)


def minihack_room_lstm(s: int, n: int) -> dict:
    return _minihack(s, n, 2, "lstm")


def _oni(s: int, n: int, reward_model: str, updates: int, client_fn) -> dict:
    """tests/test_oni.py::_run at seeds n*s .. n*s+n-1: fraction of the greedy... sampled actions that produce the
    helpful message after training."""
    from agents.testing import oni_bandit_run
    out = {"frac": [], "active_frac": [], "pairs": []}
    for seed in range(n * s, n * s + n):
        client, close = client_fn()
        try:
            frac, m, _ = oni_bandit_run(reward_model, client, updates=updates, seed=seed)
        finally:
            close()
        out["frac"].append(float(frac))
        out["active_frac"].append(float(m["intrinsic/active_frac"][-1]) if "intrinsic/active_frac" in m else np.nan)
        out["pairs"].append(float(m["labels/pairs"][-1]) if "labels/pairs" in m else np.nan)
    return {k: np.array(v) for k, v in out.items()}


def _instant(labels=None, scores=None):
    def make():
        from jaxrl_pref.testing import InstantClient
        return InstantClient(labels=labels, scores=scores), (lambda: None)
    return make


HELPFUL = "You find a hidden passage."


def oni_retrieval(s: int, n: int) -> dict:
    """tests/test_oni.py::test_agent_learns_to_produce_the_helpful_message[retrieval] (default suite)."""
    return _oni(s, n, "retrieval", 24, _instant(labels={HELPFUL: 1.0}))


def oni_classification(s: int, n: int) -> dict:
    """tests/test_oni.py::test_agent_learns_to_produce_the_helpful_message[classification]."""
    return _oni(s, n, "classification", 24, _instant(labels={HELPFUL: 1.0}))


def oni_classification60(s: int, n: int) -> dict:
    """The classification test with 60 updates instead of 24."""
    return _oni(s, n, "classification", 60, _instant(labels={HELPFUL: 1.0}))


def oni_ranking(s: int, n: int) -> dict:
    """tests/test_oni.py::test_agent_learns_from_pairwise_preferences."""
    return _oni(s, n, "ranking", 40, _instant(scores={HELPFUL: 1.0}))


def oni_service(s: int, n: int) -> dict:
    """tests/test_oni.py::test_agent_with_real_annotator_service: the embedded-MiniLM service subprocess, labels
    waited for (see the test), 60 updates."""
    import tempfile
    from jaxrl_pref.annotation.client import AnnotatorClient, start_server, stop_server

    from jaxrl_pref.testing import TOY_PROMPT

    def make():
        d = Path(tempfile.mkdtemp())
        (d / "prompts").mkdir()
        (d / "prompts" / "toy.v1.txt").write_text(TOY_PROMPT)
        proc, url = start_server(str(d / "labels.db"), "embedded", extra_args=["--prompt-dir", str(d / "prompts")])
        client = AnnotatorClient(url, "toy", poll_interval=0.05, wait=300.0)

        def close():
            client.close()
            stop_server(proc)
        return client, close
    return _oni(s, n, "retrieval", 60, make)


TASKS = {f.__name__: f for f in (
    cartpole, pendulum, xminigrid_door_key, heron_pendulum, sqirl_deep_sea, sqirl_deep_sea4, sqirl_deep_sea4_128,
    sqirl_chain, sqirl_host_deep_sea, sqirl_host_deep_sea128, sebulba_cartpole, sebulba_cartpole_overlap,
    minihack_room_g1, minihack_room_g2, oni_retrieval, oni_classification, oni_classification60, oni_ranking,
    oni_service, minihack_room_lstm, memory_chain_mlp, memory_chain_gru, memory_chain_lstm, cartpole_gru, acrobot_gru,
    keydoor9_ppo, keydoor9_e3b, deepsea10_ppo, deepsea10_e3b, keyroom_ppo, keyroom_e3b, keyroom_rnd, rnd_novelty,
    e3b_inverse, oni_classifier, random_success, oni_captioned_key, oni_captioned_locked)}
# per task: seeds per test (one set) and the checks the test makes on them, (statistic, aggregate over the set,
# comparison, bound); keep in sync with the tests' assertions
TESTS = {
    "cartpole": (8, [("final", "count>=475", ">=", 7)]),
    "pendulum": (4, [("final", "mean", ">=", -320), ("final", "min", ">=", -400), ("gain", "min", ">", 700)]),
    "xminigrid_door_key": (8, [("success", "count>=0.9", ">=", 5), ("return", "median", ">=", 0.8)]),
    "memory_chain_mlp": (4, [("success", "max", "<", 0.7)]),
    "memory_chain_gru": (4, [("success", "count>=0.9", ">=", 3)]),
    "memory_chain_lstm": (4, [("success", "count>=0.9", ">=", 3)]),
    "cartpole_gru": (3, [("peak", "count>=475", ">=", 2)]),
    "acrobot_gru": (4, [("final", "count>=-250", ">=", 2)]),
    "heron_pendulum": (1, [("first", "max", "<", -1000), ("final", "min", ">", -700)]),
    "sqirl_deep_sea": (8, [("success", "count>=1", ">=", 5), ("explore_success", "max", "<", 0.2)]),
    "sqirl_deep_sea4": (8, [("success", "count>=1", ">=", 4)]),
    "sqirl_deep_sea4_128": (8, [("success", "count>=1", ">=", 4)]),
    "sqirl_chain": (1, [("k3", "min", ">=", 1.0), ("k1_gamma0", "max", "<=", 0.5), ("k1_gamma0.9", "max", "<=", 0.5)]),
    "sqirl_host_deep_sea": (2, [("success", "count>=1", ">=", 1)]),
    "sqirl_host_deep_sea128": (2, [("success", "count>=1", ">=", 1)]),
    "sebulba_cartpole": (1, [("final", "min", ">", 45)]),  # default suite
    "sebulba_cartpole_overlap": (1, [("final", "min", ">", 45)]),
    "minihack_room_g1": (1, [("final", "min", ">", 0.345 + 0.4)]),  # the test's random return (seed 100) + 0.4
    "minihack_room_g2": (1, [("final", "min", ">", 0.345 + 0.4)]),
    "minihack_room_lstm": (1, [("final", "min", ">", 0.345 + 0.4)]),
    "oni_retrieval": (1, [("frac", "min", ">", 0.7), ("active_frac", "min", ">", 0.5)]),
    "oni_classification": (1, [("frac", "min", ">", 0.7)]),  # 24 updates: what the test had; too unreliable
    "oni_classification60": (1, [("frac", "min", ">", 0.7), ("active_frac", "min", ">", 0.5)]),
    "oni_ranking": (1, [("frac", "min", ">", 0.8), ("pairs", "min", ">=", 5)]),
    "oni_service": (1, [("frac", "min", ">", 0.8)]),
    "rnd_novelty": (8, [("after/first", "median", "<", 0.3), ("new/after", "median", ">", 10)]),
    "e3b_inverse": (8, [("first", "median", "<", 0.7), ("last", "median", ">", 0.9)]),
    "oni_classifier": (8, [("train_acc", "median", ">", 0.95), ("held_out_acc", "median", ">=", 0.9)]),
    "keyroom_e3b": (2, [("success", "mean", ">=", 0.2)]),  # and mean(e3b) - mean(ppo) >= 0.2: keyroom_margin()
    "keyroom_ppo": (2, []),  # not bounded on its own (PPO's failure is measured, not asserted)
    "oni_captioned_key": (8, [("helpful", "median", ">=", 0.9)]),  # "none" measured, not asserted (bimodal)
    "oni_captioned_locked": (8, [("locked", "median", "<=", 0.1)]),
    "random_success": (1, []),  # the test bounds each task's count by exact binomial tails (tests/test_sparse.py)
}
OPS = {">=": np.greater_equal, ">": np.greater, "<": np.less, "<=": np.less_equal}


def _aggregate(x: np.ndarray, how: str) -> float:
    if how.startswith("count>="):
        return float((x >= float(how.split(">=")[1])).sum())
    return float(getattr(np, how)(x))


def summary(task: str, record: Path = RECORD) -> None:
    """Per-seed spread of each statistic over every recorded seed, then each check of the test: its value per
    recorded seed set of the test's size and over 4000 sets of that size drawn from all recorded seeds (standing in
    for other machines): mean, std, mean - 3 std (or + 3 std for an upper bound), worst, and how often the bound
    fails."""
    rows = [r for r in map(json.loads, record.read_text().splitlines()) if r["task"] == task] if record.exists() else []
    if not rows:
        print(f"{task}: nothing recorded")
        return
    n, checks = TESTS.get(task, (len(rows[0]["values"][next(iter(rows[0]["values"]))]), []))  # no test yet: spread
    keys = list(dict.fromkeys(k for r in rows for k in r["values"]))
    per_seed = {k: np.concatenate([np.asarray(r["values"][k], float) for r in rows if k in r["values"]])
                for k in keys}
    print(f"{task}: {len(rows)} seed set(s), {max(len(v) for v in per_seed.values())} seeds, "
          f"{rows[0]['date']}..{rows[-1]['date']}, {rows[0]['host']}")
    for k, v in per_seed.items():
        v = v[np.isfinite(v)]
        if v.size:
            print(f"  per seed {k:>16}: mean {v.mean():9.3f}  std {v.std(ddof=1) if v.size > 1 else 0.0:8.3f}  "
                  f"min {v.min():9.3f}  max {v.max():9.3f}")
    rng = np.random.default_rng(0)
    for stat, how, op, bound in checks:
        if stat not in per_seed:
            continue
        v = per_seed[stat][np.isfinite(per_seed[stat])]
        sets = [_aggregate(np.asarray(r["values"][stat], float)[i:i + n], how) for r in rows if stat in r["values"]
                for i in range(0, len(r["values"][stat]) - n + 1, n)]
        boot = np.array([_aggregate(rng.choice(v, n, replace=False), how) for _ in range(4000)])
        fails = float((~OPS[op](boot, bound)).mean())
        edge = boot.mean() - 3 * boot.std() if op.startswith(">") else boot.mean() + 3 * boot.std()
        worst = boot.min() if op.startswith(">") else boot.max()
        print(f"  check {how}({stat}) over {n} seed(s) {op} {bound}: per recorded set {np.round(sets, 3).tolist()}; "
              f"resampled mean {boot.mean():.3f} std {boot.std():.3f} worst {worst:.3f} "
              f"(mean {'-' if op.startswith('>') else '+'} 3 std {edge:.3f}); fails in {100 * fails:.2f}% of sets")
        # k of n (and a median, which fails only once half the seeds miss): binomial with the per-seed miss rate
        # (misses + 1) / (N + 2), which stays above zero when no seed missed
        if (how.startswith("count>=") and op == ">=") or (how == "median" and n > 1):
            thr, k = (float(how.split(">=")[1]), int(np.ceil(bound))) if how != "median" else (bound, n - n // 2 + 1)
            miss = int((v < thr).sum()) if how != "median" else int((~OPS[op](v, bound)).sum())
            q = (miss + 1) / (len(v) + 2)
            p_fail = sum(math.comb(n, j) * (1 - q) ** j * q ** (n - j) for j in range(k))
            side = "below" if how != "median" or op.startswith(">") else "above"
            print(f"    {miss} of {len(v)} seeds {side} {thr}; at a per-seed rate of {q:.4f} this check fails w.p. "
                  f"{100 * p_fail:.2g}%{' (at most: fewer than half missing never fails)' if how == 'median' else ''}")
        elif how in ("min", "max"):  # n of n seeds must pass: binomial with the same per-seed rate
            miss = int((~OPS[op](v, bound)).sum())
            q = (miss + 1) / (len(v) + 2)
            print(f"    {miss} of {len(v)} seeds miss the bound; at a per-seed rate of {q:.4f} this check fails w.p. "
                  f"{100 * (1 - (1 - q) ** n):.2g}% (Laplace rate: an upper estimate when none missed)")
        if not how.startswith("count>=") and boot.std() > 0:  # a normal tail, for mean/min/max checks
            z = (boot.mean() - bound) / boot.std() * (1 if op.startswith(">") else -1)
            print(f"    normal approximation: the bound is {z:.1f} std from the mean; fails w.p. "
                  f"{100 * 0.5 * math.erfc(z / math.sqrt(2)):.2g}%")


# checks across two tasks: (task, other task, statistic, seeds per task, bound): mean(task) - mean(other) >= bound
MARGINS = {"keyroom_e3b": ("keyroom_ppo", "success", 2, 0.2)}


def margin_summary(task: str, record: Path = RECORD) -> None:
    """For a check ``mean(task) - mean(other) >= bound`` over n seeds of each: the margin over 4000 draws of n
    recorded seeds of each task, how often it misses the bound, and a normal tail."""
    other, stat, n, bound = MARGINS[task]
    rows = [json.loads(x) for x in record.read_text().splitlines()]
    a, b = ([np.asarray(v, float) for r in rows if r["task"] == t for v in [r["values"].get(stat, [])]] for t in
            (task, other))
    a, b = np.concatenate(list(a) or [np.zeros(0)]), np.concatenate(list(b) or [np.zeros(0)])
    if a.size < n or b.size < n:
        return
    rng = np.random.default_rng(0)
    m = np.array([rng.choice(a, n, replace=False).mean() - rng.choice(b, n, replace=False).mean()
                  for _ in range(4000)])
    z = (m.mean() - bound) / m.std() if m.std() > 0 else float("inf")
    print(f"  check mean({task}.{stat}) - mean({other}.{stat}) over {n} seeds each >= {bound} ({a.size} and {b.size} "
          f"seeds recorded): resampled mean {m.mean():.3f} std {m.std():.3f} worst {m.min():.3f}; fails in "
          f"{100 * (m < bound).mean():.2f}% of draws; normal approximation: {z:.1f} std, fails w.p. "
          f"{100 * 0.5 * math.erfc(z / math.sqrt(2)):.2g}%")


_VMAPPED = {"cartpole", "pendulum", "xminigrid_door_key", "heron_pendulum", "sqirl_deep_sea", "sqirl_deep_sea4",
            "sqirl_deep_sea4_128", "sqirl_chain", "memory_chain_mlp", "memory_chain_gru",
            "memory_chain_lstm", "cartpole_gru", "rnd_novelty", "e3b_inverse", "oni_classifier", "random_success"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), action="append")
    ap.add_argument("--sets", type=int, default=1, help="seed sets to run")
    ap.add_argument("--first-set", type=int, default=1, help="first seed set (0: the tests' own seeds)")
    ap.add_argument("--set-size", type=int, help="seeds per set (default: the test's)")
    ap.add_argument("--summary", action="store_true", help="only report the recorded spread (of --task, or all)")
    ap.add_argument("--record", type=Path, default=RECORD, help="JSON-lines file the per-seed values go to")
    a = ap.parse_args(argv)
    if a.summary or not a.task:  # report what is recorded (for --task: those tasks); runs nothing
        for task in (a.task or TASKS):
            summary(task, a.record)
            if task in MARGINS:
                margin_summary(task, a.record)
        return
    for task in a.task:
        n = a.set_size or TESTS[task][0]
        for s in range(a.first_set, a.first_set + a.sets):
            t0 = time.perf_counter()
            vals = TASKS[task](s, n)
            wall = time.perf_counter() - t0
            seeds = f"split(PRNGKey({s}), {n})" if task in _VMAPPED else list(range(n * s, n * s + n))
            row = {"task": task, "set": s, "seeds": seeds,
                   "values": {k: np.asarray(v).tolist() for k, v in vals.items()},
                   "wall_s": round(wall, 1), "date": datetime.date.today().isoformat(),
                   "host": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus",
                   "code": _commit()}
            with a.record.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task} set {s}: " + ", ".join(f"{k} {np.round(v, 3).tolist()}" for k, v in vals.items())
                  + f"  ({wall:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
