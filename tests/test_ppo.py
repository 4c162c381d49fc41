"""PPO: learning tests at fixed seeds, vmap over hyperparameters, data parallelism, the public pieces, the
reward-transform seam."""
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from agents import ppo
from jaxrl_pref.config import ConfigError
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rollout import collect
from jaxrl_pref.stats import final_score

TINY = dict(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=4 * 16 * 6)


def final_return(metrics, last=10):
    return final_score(metrics["episode_return"], last=last)


@pytest.mark.slow
@pytest.mark.run_bound
def test_cartpole_reaches_475_for_7_of_8_seeds():
    """The issue's bar: default config (4 envs x 128 steps, 500k steps), 8 seeds in one compiled call; k of n
    already, as fixed seeds do not fix the outcome across machines. Measured (``python -m
    benchmarks.learning_spread --task cartpole``, 2026-12-02): every one of 48 other seeds ends at 500.0; even at
    a per-seed miss rate of (0 + 1) / (48 + 2) = 0.02, 2 misses of 8 happen w.p. about 1%."""
    cfg = ppo.Config()
    out = jax.jit(jax.vmap(ppo.make_train(cfg)))(jax.random.split(jax.random.PRNGKey(0), 8))
    chex.assert_shape(out.metrics["episode_return"], (8, cfg.num_updates))
    final = final_return(out.metrics)
    assert (final >= 475).sum() >= 7, final


@pytest.mark.slow
@pytest.mark.run_bound
def test_pendulum_continuous_actions_learn():
    """Continuous actions (diagonal Gaussian): Pendulum-v1, 200k steps, 4 seeds in one call. A random policy scores
    about -1250. Bar: mean over the 4 seeds >= -320, each >= -400, each gains > 700 over its first update.
    Measured (``python -m benchmarks.learning_spread --task pendulum``, 2026-12-02, 24 seeds): final return per seed
    mean -232, std 30, min -317; gain min 827. Over sets of 4 seeds: mean -232 +- 14 (worst -276; bound -320 is 6
    std below), the worst seed -264 +- 28 (bound -400 is 4.8 std below), the smallest gain 928 +- 56 (bound 700 is
    4 std below)."""
    cfg = ppo.Config(env_name="Pendulum-v1", num_envs=4, num_steps=1024, total_timesteps=200_000,
                     learning_rate=3e-4, update_epochs=10, num_minibatches=64, gamma=0.9, ent_coef=0.0,
                     normalize_obs=True, normalize_reward=True)
    out = jax.jit(jax.vmap(ppo.make_train(cfg)))(jax.random.split(jax.random.PRNGKey(0), 4))
    first = np.asarray(out.metrics["episode_return"])[:, 0]
    final = final_return(out.metrics, last=3)
    assert final.mean() >= -320 and (final >= -400).all(), final
    assert (final - first > 700).all(), (first, final)


def test_metrics_and_state_shapes():
    cfg = ppo.Config(**TINY)
    out = jax.jit(ppo.make_train(cfg))(jax.random.PRNGKey(0))
    for k in ("episode_return", "episode_length", "episodes", "loss/policy", "loss/value", "loss/entropy",
              "loss/approx_kl", "loss/clip_frac"):
        chex.assert_shape(out.metrics[k], (cfg.num_updates,))
    assert int(out.runner_state.update_step) == cfg.num_updates
    chex.assert_shape(out.runner_state.obs, (cfg.num_envs, 4))
    assert np.isfinite(np.asarray(out.metrics["loss/value"])).all()


def test_vmap_over_hyperparameters_equals_separate_runs():
    cfg = ppo.Config(**TINY)
    lrs, ents, clips = [1e-4, 1e-3, 3e-3], [0.0, 0.01, 0.05], [0.1, 0.2, 0.3]
    hp = ppo.hparams(cfg, learning_rate=jnp.array(lrs), ent_coef=jnp.array(ents), clip_eps=jnp.array(clips))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    train = ppo.make_train(cfg)
    batched = jax.jit(jax.vmap(train))(keys, hp)
    single = jax.jit(train)
    for i in range(3):
        one = single(keys[i], ppo.hparams(cfg, learning_rate=lrs[i], ent_coef=ents[i], clip_eps=clips[i]))
        # equal up to float32 summation order: XLA's batched and unbatched kernels add in different orders (on an
        # AVX-512 CPU two of 128 weights near 4e-3 end 1.1e-6 apart after training); the settings differ (below)
        for a, b in zip(jax.tree.leaves(one.train_state.params), jax.tree.leaves(batched.train_state.params)):
            np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=1e-5)
        np.testing.assert_allclose(one.metrics["loss/value"], batched.metrics["loss/value"][i], rtol=2e-5)
    # the three settings really differ
    p = jax.tree.leaves(batched.train_state.params)[0]
    assert not np.allclose(p[0], p[1])


def test_every_float_hyperparameter_vmaps_and_matters():
    """README: any of learning_rate, gamma, gae_lambda, clip_eps, ent_coef, vf_coef, max_grad_norm may be an
    array. One program vmapped over 8 settings (the config's, then each field changed alone) gives, per setting,
    what an unbatched run of that setting gives (up to float summation order, as above), and each changed field
    changes the trained parameters (so none of them is silently read from the config instead)."""
    cfg = ppo.Config(**TINY)
    changes = {"learning_rate": 1e-3, "gamma": 0.9, "gae_lambda": 0.5, "clip_eps": 0.05, "ent_coef": 0.5,
               "vf_coef": 2.0, "max_grad_norm": 0.01}
    settings = [{}] + [{k: v} for k, v in changes.items()]
    hp = ppo.hparams(cfg, **{k: jnp.array([st.get(k, getattr(cfg, k)) for st in settings]) for k in changes})
    key = jax.random.PRNGKey(4)
    train = ppo.make_train(cfg)
    batched = jax.jit(jax.vmap(train, in_axes=(None, 0)))(key, hp)
    single = jax.jit(train)

    def flat(params):
        return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])

    base = flat(jax.tree.map(lambda x: x[0], batched.train_state.params))
    for i, st in enumerate(settings):
        one = single(key, ppo.hparams(cfg, **st))
        b = flat(jax.tree.map(lambda x: x[i], batched.train_state.params))
        np.testing.assert_allclose(flat(one.train_state.params), b, rtol=2e-5, atol=1e-5, err_msg=str(st))
        np.testing.assert_allclose(one.metrics["loss/value"], batched.metrics["loss/value"][i], rtol=2e-5,
                                   err_msg=str(st))
        if st:  # 10x the tolerance above (measured: 5e-4 for ent_coef, the smallest, up to 5e-2)
            assert np.abs(b - base).max() > 1e-4, (st, np.abs(b - base).max())


def test_hparams_rejects_unknown_field():
    with pytest.raises(ConfigError, match="num_envs"):
        ppo.hparams(ppo.Config(**TINY), num_envs=jnp.array([1, 2]))


@pytest.mark.parametrize("bad, field", [
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(num_envs=6, num_devices=4), "num_envs"),
    (dict(num_minibatches=3), "num_minibatches"),
    (dict(env_name="NoSuchEnv-v0"), "env_name"),
    (dict(gamma=1.5), "gamma"),
    (dict(activation="sigmoidish"), "activation"),
])
def test_config_errors_name_the_field(bad, field):
    with pytest.raises(ConfigError) as e:
        ppo.Config(**{**TINY, **bad})
    assert e.value.field == field and "Fix:" in str(e.value)


def test_pieces_usable_outside_the_trainer():
    """A host-style loop built from the public pieces: collect -> targets -> update."""
    cfg = ppo.Config(**TINY)
    env, params = envs.make("CartPole-v1", num_envs=cfg.num_envs)
    agent = ppo.PPO(cfg, envs.spec(env, params))
    hp = ppo.hparams(cfg)
    key = jax.random.PRNGKey(0)
    state = agent.init(key, hp)
    obs, env_state = env.reset(key, params)
    action, log_prob, value = agent.act(state.params, obs, key)
    chex.assert_shape([action, log_prob, value], (cfg.num_envs,))
    chex.assert_type(action, jnp.int32)
    env_state, last_obs, traj = collect(env, params, jax.tree_util.Partial(agent.act, state.params), env_state,
                                        obs, key, cfg.num_steps)
    chex.assert_shape(traj.obs, (cfg.num_steps, cfg.num_envs, 4))
    adv, ret = agent.targets(state.params, hp, traj, traj.reward, last_obs)
    chex.assert_shape([adv, ret], (cfg.num_steps, cfg.num_envs))
    new, metrics = jax.jit(agent.update)(state, hp, traj, adv, ret, key)
    chex.assert_trees_all_equal_shapes(new.params, state.params)
    assert not np.allclose(jax.tree.leaves(new.params)[0], jax.tree.leaves(state.params)[0])
    assert set(metrics) >= {"loss/policy", "loss/value", "loss/entropy", "loss/approx_kl", "loss/clip_frac"}


class Scaled:
    """A reward transform (see jaxrl_pref.rewards.transform): learning reward = scale * env reward. Its state
    counts the ``update`` calls, so the trainer's final reward state shows whether it threaded the state through."""

    def __init__(self, scale):
        self.scale = scale

    def init(self, key, spec):
        return {"scale": jnp.float32(self.scale), "updates": jnp.int32(0)}

    def update(self, state, traj, key, axis_name=None):
        return {**state, "updates": state["updates"] + 1}, {"reward/scale": state["scale"]}

    def __call__(self, state, traj):
        return state["scale"] * traj.reward, {"reward/learning_mean": (state["scale"] * traj.reward).mean()}


def test_reward_transform_seam():
    cfg = ppo.Config(**TINY)
    key = jax.random.PRNGKey(2)
    plain = jax.jit(ppo.make_train(cfg))(key)
    ident = jax.jit(ppo.make_train(cfg, reward=IdentityReward()))(key)
    for a, b in zip(jax.tree.leaves(plain.train_state.params), jax.tree.leaves(ident.train_state.params)):
        np.testing.assert_array_equal(a, b)
    # scale 1 is the identity: the trainer learns from what the transform returns, nothing else
    one = jax.jit(ppo.make_train(cfg, reward=Scaled(1.0)))(key)
    for a, b in zip(jax.tree.leaves(plain.train_state.params), jax.tree.leaves(one.train_state.params)):
        np.testing.assert_array_equal(a, b)
    scaled = jax.jit(ppo.make_train(cfg, reward=Scaled(10.0)))(key)
    # the trainer called update once per update and carried the transform's state from one update to the next
    assert int(scaled.runner_state.reward_state["updates"]) == cfg.num_updates
    # same episodes were collected in the first update, but the value targets are 10x larger
    np.testing.assert_array_equal(plain.metrics["episode_return"][0], scaled.metrics["episode_return"][0])
    assert float(scaled.metrics["loss/value"][0]) > 20 * float(plain.metrics["loss/value"][0])
    # episode_return reports the env's return, not the learning reward: CartPole pays +1 per step, so in every
    # update the mean return of the finished episodes is their mean length (the learning reward would give 10x)
    np.testing.assert_array_equal(scaled.metrics["episode_return"], scaled.metrics["episode_length"])
    assert np.isfinite(np.asarray(scaled.metrics["episode_return"])).sum() >= cfg.num_updates - 1


def test_log_callback_every_n_updates():
    cfg = ppo.Config(**TINY)
    seen = []
    out = jax.jit(ppo.make_train(cfg, log_fn=lambda s, m: seen.append((int(s), float(m["loss/value"]))),
                                 log_every=2))(jax.random.PRNGKey(0))
    jax.effects_barrier()
    assert [s for s, _ in seen] == [2, 4, 6]
    np.testing.assert_allclose([v for _, v in seen], np.asarray(out.metrics["loss/value"])[[1, 3, 5]], rtol=1e-6)


MULTI = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from agents import ppo
    ndev = int(sys.argv[1])
    cfg = ppo.Config(env_name="CartPole-v1", num_envs=8, num_steps=32, total_timesteps=8 * 32 * 4,
                     num_devices=ndev)
    trainer = ppo.make_trainer(cfg)
    rs = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    rs, m = jax.jit(trainer.run, static_argnums=2)(rs, None, cfg.num_updates)
    leaf = jax.tree.leaves(rs.train_state.params)[0]
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == ndev, len(shards)
    for s in shards[1:]:
        np.testing.assert_array_equal(shards[0], s)   # replicated parameters stay identical
    assert rs.obs.shape == (8, 4) and len(rs.obs.sharding.device_set) == ndev
    assert np.isfinite(np.asarray(m["loss/value"])).all()
    print("OK", ndev, float(m["episode_return"][-1]), float(m["loss/value"][-1]))
""")


@pytest.mark.parametrize("ndev", [2, 4])
def test_data_parallel_devices(ndev):
    r = subprocess.run([sys.executable, "-c", MULTI, str(ndev)], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"OK {ndev}")


def test_too_many_devices_is_a_config_error():
    with pytest.raises(ConfigError, match="num_devices"):
        ppo.make_trainer(ppo.Config(**{**TINY, "num_envs": 64, "num_devices": 64, "total_timesteps": 64 * 16 * 2}))


NORM_MULTI = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from agents import ppo
    from envs.wrappers import RunningMoments
    from jaxrl_pref import distributed
    ndev = int(sys.argv[1])
    # the moments' update under shard_map equals one update on all devices' samples together
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3)) * 3 + 1
    m0 = RunningMoments.create((3,)).update(x[:2] * 0.5, 1)
    mesh = distributed.data_mesh(ndev)
    f = distributed.shard(lambda xs: m0.update(xs, 1, distributed.DATA_AXIS), mesh, in_specs=(P(distributed.DATA_AXIS),),
                          out_specs=distributed.REPLICATED)
    got, want = f(x), m0.update(x, 1)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # PPO with both normalisers over ndev devices: trains, and every device holds the same statistics
    cfg = ppo.Config(env_name="CartPole-v1", num_envs=8, num_steps=32, total_timesteps=8 * 32 * 4,
                     num_devices=ndev, normalize_obs=True, normalize_reward=True)
    trainer = ppo.make_trainer(cfg)
    rs = jax.jit(trainer.init)(jax.random.PRNGKey(0))
    rs, m = jax.jit(trainer.run, static_argnums=2)(rs, None, cfg.num_updates)
    # data parallel (test_data_parallel_devices, nightly, checks it without the normalisers): the parameters are
    # replicated and stay identical on every device, the envs are split over the devices
    leaf = jax.tree.leaves(rs.train_state.params)[0]
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == ndev, len(shards)
    for s in shards[1:]:
        np.testing.assert_array_equal(shards[0], s)
    assert rs.obs.shape == (8, 4) and len(rs.obs.sharding.device_set) == ndev
    moments = [rs.env_state.moments, rs.env_state.env_state.moments]  # reward's, observations'
    for mo in moments:
        for leaf in jax.tree.leaves(mo):
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            assert len(shards) == ndev
            for s in shards[1:]:
                np.testing.assert_array_equal(shards[0], s)
    assert float(moments[1].count) > 8 * 32 * 4  # every device's envs counted: all 8 envs x 128 steps
    assert np.isfinite(np.asarray(m["loss/value"])).all()
    print("OK", ndev)
""")


@pytest.mark.parametrize("ndev", [2, 4])
def test_normalisation_statistics_are_shared_across_devices(ndev):
    """--normalize-obs/--normalize-reward on several devices: the running moments are replicated and updated from
    all devices' samples (pmean of the batch moments), equal to one update on the whole batch; and what
    test_data_parallel_devices checks of PPO over several devices (replicated parameters, the envs sharded)."""
    r = subprocess.run([sys.executable, "-c", NORM_MULTI, str(ndev)], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f"OK {ndev}")
