"""Reward streams with their own value heads (``--bonus-value-head``; jaxrl_pref.rewards.transform.Stream): RND's
non-episodic intrinsic return next to the episodic extrinsic one, through the shared PPO."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from agents import ppo, ppo_host
from envs.host import JaxHostEnv
from jaxrl_pref.config import ConfigError
from jaxrl_pref.losses import gae, ppo_loss
from jaxrl_pref.networks import MLP, EncoderActorCritic
from jaxrl_pref.rewards import IdentityReward, Stream, reward_streams
from jaxrl_pref.rewards.bonus import BonusConfig, WithBonus, with_bonus
from jaxrl_pref.rollout import collect
from jaxrl_pref.transfer import pack_outputs, unpack_outputs

TINY = dict(env_name="DeepSea-8", num_envs=8, num_steps=16, update_epochs=1, num_minibatches=2, hidden=(16,),
            total_timesteps=8 * 16 * 3)
SMALL_BONUS = dict(bonus_hidden=(16,), bonus_features=8)
TWO = (Stream("extrinsic"), Stream("intrinsic", episodic=False, gamma=0.5))


def test_each_stream_gets_its_own_return_and_the_intrinsic_one_runs_across_episode_ends():
    """Two streams on CartPole rollouts: column 0 is exactly the one-stream targets of its rewards and values
    (cut at termination, V(final_obs) at truncation); column 1 is GAE with its own gamma and no cut anywhere, the
    next step's value (a new episode's first observation) bootstrapped across every episode end."""
    cfg = ppo.Config(env_name="CartPole-v1", num_envs=4, num_steps=64, hidden=(16,))
    env, params = envs.make("CartPole-v1", num_envs=cfg.num_envs)
    agent = ppo.PPO(cfg, envs.spec(env, params), streams=TWO)
    hp = ppo.hparams(cfg)
    key = jax.random.PRNGKey(0)
    state = agent.init(key, hp)
    assert state.params["params"]["Dense_1"]["kernel"].shape == (16, 2)  # the critic's output layer: two heads
    obs, env_state = env.reset(key, params)
    _, last_obs, traj = collect(env, params, jax.tree_util.Partial(agent.act, state.params), env_state, obs, key,
                                cfg.num_steps)
    chex.assert_shape(traj.value, (cfg.num_steps, cfg.num_envs, 2))
    assert bool(traj.terminated.any())
    # a truncation (data only: its final_obs is the true next observation, the next step a fresh episode)
    traj = traj.replace(truncated=traj.truncated.at[10, 1].set(True))
    rng = np.random.default_rng(0)
    reward = jnp.asarray(rng.normal(size=(cfg.num_steps, cfg.num_envs, 2)), jnp.float32)
    adv, ret = agent.targets(state.params, hp, traj, reward, last_obs)
    chex.assert_shape([adv, ret], (cfg.num_steps, cfg.num_envs, 2))

    last_v = agent.value(state.params, last_obs)
    final_v = agent.value(state.params, traj.final_obs)
    shifted = jnp.concatenate([traj.value[1:], last_v[None]])
    nxt0 = jnp.where(traj.truncated, final_v[..., 0], shifted[..., 0])
    a0, r0 = gae(reward[..., 0], traj.value[..., 0], nxt0, traj.terminated, traj.done, hp.gamma, hp.gae_lambda)
    np.testing.assert_allclose(adv[..., 0], a0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret[..., 0], r0, rtol=1e-5, atol=1e-5)
    # the intrinsic stream by hand: delta_t = r_t + 0.5 V(s_{t+1}) - V(s_t), A_t = delta_t + 0.5 lambda A_{t+1}
    r1, v1, n1 = (np.asarray(x) for x in (reward[..., 1], traj.value[..., 1], shifted[..., 1]))
    expect = np.zeros_like(r1)
    running = np.zeros(cfg.num_envs, np.float32)
    for t in reversed(range(cfg.num_steps)):
        running = r1[t] + 0.5 * n1[t] - v1[t] + 0.5 * float(hp.gae_lambda) * running
        expect[t] = running
    np.testing.assert_allclose(adv[..., 1], expect, rtol=1e-4, atol=1e-4)
    # ...which differs from the episodic return wherever an episode ended before the rollout's end
    cut, _ = gae(reward[..., 1], traj.value[..., 1], shifted[..., 1], traj.terminated, traj.done, 0.5,
                 hp.gae_lambda)
    assert not np.allclose(adv[..., 1], cut, atol=1e-3)


def test_the_value_losses_of_the_heads_add():
    rng = np.random.default_rng(1)
    B = 32
    new_v, old_v, ret = (jnp.asarray(rng.normal(size=(B, 2)), jnp.float32) for _ in range(3))
    lp = jnp.asarray(rng.normal(size=B) * 0.1, jnp.float32)
    adv = jnp.asarray(rng.normal(size=B), jnp.float32)
    kw = dict(clip_eps=0.2, vf_coef=0.5, ent_coef=0.0)
    total, m = ppo_loss(lp, lp, adv, jnp.zeros(B), new_v, old_v, ret, **kw)
    one = [ppo_loss(lp, lp, adv, jnp.zeros(B), new_v[:, k], old_v[:, k], ret[:, k], **kw)[1]["loss/value"]
           for k in range(2)]
    np.testing.assert_allclose(m["loss/value"], one[0] + one[1], rtol=1e-6)
    np.testing.assert_allclose(m["loss/value_heads"], one, rtol=1e-6)
    assert "loss/value_heads" not in ppo_loss(lp, lp, adv, jnp.zeros(B), new_v[:, 0], old_v[:, 0], ret[:, 0],
                                              **kw)[1]


def test_outputs_round_trip_with_several_value_heads():
    a, lp = jnp.array([0, 7, 3]), jnp.array([-0.5, -1.0, 0.0])
    v = jnp.array([[1.5, -2.0], [3.0, 4.0], [np.nan, 0.25]])
    action, log_prob, value = unpack_outputs(np.asarray(jax.jit(pack_outputs)(a, lp, v)))
    np.testing.assert_array_equal(action, [0, 7, 3])
    np.testing.assert_array_equal(log_prob, np.asarray(lp))
    np.testing.assert_array_equal(value, np.asarray(v))


def test_bonus_value_head_option_builds_a_second_stream():
    with pytest.raises(ConfigError) as e:
        BonusConfig(bonus_value_head=True)
    assert e.value.field == "bonus_value_head"
    with pytest.raises(ConfigError) as e:
        BonusConfig(bonus="rnd", bonus_gamma=1.5)
    assert e.value.field == "bonus_gamma"
    assert reward_streams(with_bonus(None, BonusConfig(bonus="rnd"), 4)) == (Stream("reward"),)
    rnd = with_bonus(None, BonusConfig(bonus="rnd", bonus_value_head=True, bonus_gamma=0.9), 4)
    assert reward_streams(rnd) == (Stream("extrinsic"), Stream("rnd", episodic=False, gamma=0.9))
    assert rnd.bonus.gamma_int == 0.9  # and RND normalises by the std of that same return
    e3b = with_bonus(None, BonusConfig(bonus="e3b", bonus_value_head=True), 4)
    assert reward_streams(e3b) == (Stream("extrinsic"), Stream("e3b", episodic=True, gamma=0.99))
    with pytest.raises(ValueError, match="several streams"):
        WithBonus(rnd, rnd.bonus, 1.0, stream=Stream("again"))
    with pytest.raises(TypeError, match="Stream"):
        reward_streams(type("Bad", (), {"streams": ("a", "b")})())


def test_the_bonus_stream_is_the_scaled_bonus_and_the_base_reward_stays_apart():
    cfg = ppo.Config(**TINY)
    split_t = with_bonus(None, BonusConfig(bonus="rnd", bonus_coef=0.3, bonus_value_head=True, **SMALL_BONUS),
                         cfg.num_envs)
    tr = ppo.make_trainer(cfg, reward=split_t)
    summed_t = WithBonus(split_t.base, split_t.bonus, split_t.coef, split_t.normalize)  # the same state, one stream
    rs = tr.init(jax.random.PRNGKey(3), None)
    _, _, traj = collect(tr.env, tr.env_params, jax.tree_util.Partial(tr.agent.act, rs.train_state.params),
                         rs.env_state, rs.obs, jax.random.PRNGKey(4), cfg.num_steps)
    split = np.asarray(split_t(rs.reward_state, traj)[0])
    summed = np.asarray(summed_t(rs.reward_state, traj)[0])
    chex.assert_shape(split, (cfg.num_steps, cfg.num_envs, 2))
    np.testing.assert_array_equal(split[..., 0], np.asarray(traj.reward))
    np.testing.assert_allclose(split.sum(-1), summed, rtol=1e-6)
    assert (split[..., 1] >= 0).all() and split[..., 1].max() > 0


class DictMLP(nn.Module):
    @nn.compact
    def __call__(self, obs):
        return MLP((16,), "relu")(obs["obs"])


@pytest.mark.parametrize("network", ["mlp", pytest.param("gru", marks=pytest.mark.slow)])
def test_ppo_with_the_rnd_value_head_trains_in_both_loops(network):
    """The jitted loop (two seeds vmapped) and the host loop (the NetHack-style dict network, cloned with two heads;
    its packed per-step outputs carry both values): each head's value loss is logged and they add up."""
    cfg = ppo.Config(**{**TINY, "network": network})
    bonus = BonusConfig(bonus="rnd", bonus_value_head=True, **SMALL_BONUS)
    tr = ppo.make_trainer(cfg, reward=with_bonus(None, bonus, cfg.num_envs))
    out = jax.jit(jax.vmap(ppo.make_train(cfg, reward=with_bonus(None, bonus, cfg.num_envs))))(
        jax.random.split(jax.random.PRNGKey(0), 2))
    m = out.metrics
    chex.assert_shape(m["loss/value_rnd"], (2, cfg.num_updates))
    np.testing.assert_allclose(m["loss/value"], m["loss/value_extrinsic"] + m["loss/value_rnd"], rtol=1e-5)
    assert np.isfinite(np.asarray(m["loss/value"])).all() and (np.asarray(m["loss/value_rnd"]) > 0).all()
    assert tr.agent.streams == (Stream("extrinsic"), Stream("rnd", episodic=False, gamma=0.99))

    env = JaxHostEnv("DeepSea-8", cfg.num_envs, seed=1)
    try:
        host = ppo_host.make_trainer(cfg, env, reward=with_bonus(None, bonus, cfg.num_envs),
                                     network=EncoderActorCritic(env.num_actions, DictMLP()))
        assert host.agent.network.value_heads == 2
        state = host.init(jax.random.PRNGKey(1))
        traj, _ = host.collect(state.train_state.params, jax.random.PRNGKey(2))
        chex.assert_shape(traj.value, (cfg.num_steps, cfg.num_envs, 2))
        state, hm = host.run(state, None, 2)
        assert int(state.update_step) == 2 and np.isfinite(hm["loss/value_rnd"]).all()
    finally:
        env.close()


def test_a_network_without_value_heads_is_refused_for_several_streams():
    class Fixed(nn.Module):
        num_actions: int = 2

        @nn.compact
        def __call__(self, obs):
            return nn.Dense(2)(obs), nn.Dense(1)(obs)[..., 0]

    env, params = envs.make("CartPole-v1", num_envs=2)
    with pytest.raises(ValueError, match="value_heads"):
        ppo.PPO(ppo.Config(), envs.spec(env, params), network=Fixed(), streams=TWO)
    assert ppo.PPO(ppo.Config(), envs.spec(env, params), network=Fixed(), streams=reward_streams(
        IdentityReward())).network.__class__ is Fixed
