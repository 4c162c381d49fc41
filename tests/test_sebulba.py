"""Host-side (Sebulba) loop: the jitted PPO learner fed by a host env (a JAX env behind the numpy interface)."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from agents import ppo
from jaxrl_pref.networks import MLP, EncoderActorCritic
from agents.ppo_host import HostTrainer
from envs.host import JaxHostEnv, host_spec


class DictMLP(nn.Module):
    @nn.compact
    def __call__(self, obs):
        return MLP((64, 64))(obs["obs"])


def _trainer(overlap, num_envs=8, num_steps=64, updates=100, lr=1e-3):
    cfg = ppo.Config(env_name="CartPole-v1", num_envs=num_envs, num_steps=num_steps, learning_rate=lr,
                     total_timesteps=num_envs * num_steps * updates)
    env = JaxHostEnv("CartPole-v1", num_envs, seed=1)
    return cfg, HostTrainer(cfg, env, network=EncoderActorCritic(2, DictMLP()), overlap=overlap)


def test_host_spec_and_collect_shapes():
    cfg, tr = _trainer(False, num_envs=4, num_steps=16)
    spec = host_spec(tr.env)
    assert spec.obs_shape == {"obs": (4,)} and spec.discrete and spec.num_actions == 2
    state = tr.init(jax.random.PRNGKey(0))
    traj, last = tr.collect(state.train_state.params, jax.random.PRNGKey(1))
    assert traj.obs["obs"].shape == (16, 4, 4) and traj.action.shape == (16, 4)
    assert traj.final_obs["obs"].shape == (16, 4, 4) and last["obs"].shape == (4, 4)
    # non-final steps: final_obs is the next observation
    nd = ~(traj.terminated | traj.truncated)[:-1]
    np.testing.assert_array_equal(traj.final_obs["obs"][:-1][nd], traj.obs["obs"][1:][nd])


@pytest.mark.parametrize("overlap", [False, True])
def test_host_loop_learns_cartpole(overlap):
    cfg, tr = _trainer(overlap)
    state = tr.init(jax.random.PRNGKey(0))
    p0 = jax.tree.leaves(state.train_state.params)[0].copy()
    state, metrics = tr.run(state, None, cfg.num_updates)
    assert metrics["episode_return"].shape == (cfg.num_updates,)
    assert int(state.update_step) == cfg.num_updates
    assert not np.allclose(p0, jax.tree.leaves(state.train_state.params)[0])
    final = np.nanmean(metrics["episode_return"][-10:])
    # random play scores about 22. Measured (benchmarks/learning_spread.py --task sebulba_cartpole /
    # sebulba_cartpole_overlap, 2026-12-02, 16 seeds each): mean of the last 10 updates 87.8 +- 12.0 (min 72.6)
    # without overlap, 116.8 +- 20.2 (min 82.5) with it; the old bound 66 was 1.8 std below the first mean. Bound
    # 45 (2x random): 3.6 std below both means, 28 below the worst seed seen
    assert final > 45, final
