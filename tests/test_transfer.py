"""Host-loop traffic (issue 23 item 5): one upload per step (observations, key and reset flags packed in one
buffer), one download per step (action, log-prob, value), the trajectory's observations kept on the device."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agents import ppo, ppo_host
from envs.host import JaxHostEnv
from jaxrl_pref import transfer
from jaxrl_pref.networks import MLP, EncoderActorCritic
from jaxrl_pref.recurrent import RecurrentState
from jaxrl_pref.transfer import ObsPacker, pack_outputs, unpack_outputs

SPEC = {"glyphs": ((9, 9), np.int16), "blstats": ((27,), np.int64), "message": ((256,), np.uint8),
        "feat": ((3,), np.float32), "mask": ((2,), np.bool_), "wide": ((4,), np.float64)}


def random_obs(rng, b):
    return {"glyphs": rng.integers(-32768, 32767, (b, 9, 9)).astype(np.int16),
            "blstats": rng.integers(-2**31, 2**31, (b, 27)), "message": rng.integers(0, 256, (b, 256)).astype(np.uint8),
            "feat": rng.normal(size=(b, 3)).astype(np.float32), "mask": rng.random((b, 2)) < 0.5,
            "wide": rng.normal(size=(b, 4))}


def test_packer_round_trip_equals_jax_conversion():
    """Every dtype comes back as jnp.asarray would give it (int64/float64 narrowed with x64 off), bit for bit, with
    any leading axes; the tail bytes are separate."""
    rng = np.random.default_rng(0)
    p = ObsPacker(SPEC, tail_bytes=5)
    assert p.width == p.nbytes + 5 == 81 * 2 + 27 * 4 + 256 + 3 * 4 + 2 + 4 * 4 + 5
    obs = random_obs(rng, 4)
    tail = rng.integers(0, 256, (4, 5)).astype(np.uint8)
    buf = p.pack(obs, tail)
    chex.assert_shape(buf, (4, p.width))
    out = jax.jit(p.unpack)(buf)
    for k, x in obs.items():
        ref = jnp.asarray(x)
        chex.assert_type(out[k], ref.dtype)
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(p.tail(jnp.asarray(buf))), tail)
    stacked = jax.jit(p.unpack)(np.stack([buf, p.pack(random_obs(rng, 4))]))  # [T, B, width]
    chex.assert_shape(stacked["glyphs"], (2, 4, 9, 9))
    np.testing.assert_array_equal(np.asarray(stacked["message"][0]), obs["message"])
    with pytest.raises(ValueError, match="glyphs"):
        p.pack({**obs, "glyphs": obs["glyphs"][:, :3]})


def test_outputs_round_trip():
    a = jnp.array([0, 7, 2**31 - 1, 3])
    lp, v = jnp.array([-0.5, -1e-8, -30.0, 0.0]), jnp.array([1.5, -2.0, 3e7, np.nan])
    action, log_prob, value = unpack_outputs(np.asarray(jax.jit(pack_outputs)(a, lp, v)))
    np.testing.assert_array_equal(action, np.asarray(a, np.int32))
    np.testing.assert_array_equal(log_prob, np.asarray(lp))
    np.testing.assert_array_equal(value, np.asarray(v))


class DictMLP(nn.Module):
    @nn.compact
    def __call__(self, obs):
        return MLP((16,), "relu")(obs["obs"])


class Counting:
    def __init__(self, monkeypatch):
        self.up = 0
        real = jax.device_put

        def device_put(x, *a, **k):
            self.up += 1
            return real(x, *a, **k)
        monkeypatch.setattr(jax, "device_put", device_put)


@pytest.mark.parametrize("network", ["mlp", "gru"])
def test_host_loop_moves_each_step_once_and_keeps_the_trajectory_on_device(network, monkeypatch):
    cfg = ppo.Config(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=4 * 16 * 2, hidden=(16,),
                     rnn_hidden=16, network=network)
    env = JaxHostEnv("CartPole-v1", cfg.num_envs, seed=1, max_steps_in_episode=6)  # episodes end inside the rollout
    tr = ppo_host.make_trainer(cfg, env, network=EncoderActorCritic(2, DictMLP()))
    state = tr.init(jax.random.PRNGKey(0))
    ps0 = tr.agent.initial_policy_state(cfg.num_envs)
    downloads = []
    real_unpack = transfer.unpack_outputs
    monkeypatch.setattr("agents.ppo_host.unpack_outputs", lambda x: downloads.append(type(x)) or real_unpack(x))
    count = Counting(monkeypatch)
    key = jax.random.PRNGKey(1)
    traj, last = tr.collect(state.train_state.params, key)
    T = cfg.num_steps
    done = np.asarray(traj.terminated | traj.truncated)
    assert done.any()
    # the first observations, then one per step (the next observations, with the next step's key and resets), and
    # the final observations of the steps where an episode ended
    assert count.up == 1 + T + int(done.any(axis=1).sum())
    assert len(downloads) == T and all(d is not np.ndarray for d in downloads)  # one device array fetched per step
    assert isinstance(traj.obs["obs"], jax.Array) and isinstance(traj.final_obs["obs"], jax.Array)
    assert isinstance(last["obs"], jax.Array)
    chex.assert_shape(traj.obs["obs"], (T, cfg.num_envs, 4))
    # the same actions, log-probs and values as the policy on the unpacked observations with each step's key
    keys = np.asarray(jax.random.key_data(jax.random.split(key, 2 * T))).reshape(T, 1, 4)
    params, carry = state.train_state.params, (ps0.carry if tr.agent.recurrent else None)
    for t in range(T):
        k = jax.random.wrap_key_data(jnp.asarray(keys[t, 0]), impl="rbg")
        obs = jax.tree.map(lambda x: x[t], traj.obs)
        if tr.agent.recurrent:
            ps = jax.tree.map(lambda x: jnp.asarray(x[t]), traj.policy_state)
            np.testing.assert_array_equal(np.asarray(ps.start), done[t - 1] if t else np.ones(cfg.num_envs, bool))
            a, lp, v, carry = tr.agent.act(params, obs, k, RecurrentState(carry, ps.start))
        else:
            a, lp, v = tr.agent.act(params, obs, k)
        np.testing.assert_array_equal(np.asarray(a), traj.action[t])
        np.testing.assert_allclose(np.asarray(lp), traj.log_prob[t], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(v), traj.value[t], rtol=1e-6, atol=1e-6)
    # final_obs: the next observation where nothing ended, the episode's last one where it did
    nxt = np.concatenate([np.asarray(traj.obs["obs"][1:]), np.asarray(last["obs"])[None]])
    fin = np.asarray(traj.final_obs["obs"])
    np.testing.assert_array_equal(fin[~done], nxt[~done])
    assert not np.array_equal(fin[done], nxt[done])


ACTOR_DEVICE_SCRIPT = r'''
import jax, numpy as np, flax.linen as nn
from agents import ppo, ppo_host
from envs.host import JaxHostEnv
from jaxrl_pref.networks import MLP, EncoderActorCritic

class DictMLP(nn.Module):
    @nn.compact
    def __call__(self, obs):
        return MLP((16,), "relu")(obs["obs"])

assert len(jax.devices()) == 2
out = {}
for network in ("mlp", "gru"):
    cfg = ppo.Config(env_name="CartPole-v1", num_envs=4, num_steps=16, total_timesteps=4 * 16 * 3, hidden=(16,),
                     rnn_hidden=16, network=network)
    params = {}
    for dev in (-1, 1):
        env = JaxHostEnv("CartPole-v1", cfg.num_envs, seed=1, max_steps_in_episode=6)
        tr = ppo_host.make_trainer(cfg, env, network=EncoderActorCritic(2, DictMLP()), actor_device=dev)
        state = tr.init(jax.random.PRNGKey(0))
        traj, last = tr.collect(state.train_state.params, jax.random.PRNGKey(1))
        where = {d.id for d in traj.obs["obs"].devices()}
        assert where == ({1} if dev == 1 else {0}), (dev, where)
        batch = tr._collect_batch(state, False)
        assert {d.id for x in jax.tree.leaves(batch) if isinstance(x, jax.Array) for d in x.devices()} == {0}
        state, metrics = tr.run(state, None, 3)
        assert {d.id for x in jax.tree.leaves(state) for d in x.devices()} == {0}
        params[dev] = [np.asarray(x) for x in jax.tree.leaves(state.train_state.params)]
    assert all(np.array_equal(a, b) for a, b in zip(params[-1], params[1])), network
print("ok")
'''


@pytest.mark.slow
def test_actor_device_acts_on_the_second_device_and_learns_the_same():
    """--actor-device 1 on 2 forced CPU devices: rollouts on device 1, learner state and the moved batch on device 0,
    parameters after 3 updates bitwise equal to acting on the learner's device."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    p = subprocess.run([sys.executable, "-c", ACTOR_DEVICE_SCRIPT], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
