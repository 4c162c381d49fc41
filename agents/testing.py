"""Agents trained on the stand-ins of :mod:`jaxrl_pref.testing`, as the learning tests train them and as
``benchmarks.learning_spread`` measures them over many seeds: ONI on the message bandit, ONI on captioned KeyDoor-5.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from agents import oni, oni_captioned, ppo
from envs import captions
from jaxrl_pref.networks import EncoderActorCritic
from jaxrl_pref.runner import run_experiment
from jaxrl_pref.testing import DictMLP, InstantClient, MessageBandit


@dataclasses.dataclass(frozen=True)
class ONIConfig(ppo.Config, oni.ONIOptions):
    """PPO's and ONI's settings in one config (what :func:`agents.oni.make_trainer` takes)."""


def oni_bandit_run(reward_model, client, updates=24, seed=0, **kw):
    """ONI with ``reward_model`` and the annotator ``client`` on :class:`~jaxrl_pref.testing.MessageBandit` (no
    extrinsic reward), ``updates`` updates of 8 envs x 16 steps: ``(fraction of action 2, "You find a hidden
    passage.", in a rollout of the trained policy, the run's metrics, the trainer)``; ``kw``: more settings."""
    cfg = ONIConfig(env_name="CartPole-v1", num_envs=8, num_steps=16, total_timesteps=8 * 16 * updates,
                    learning_rate=3e-3, update_epochs=2, num_minibatches=2, ent_coef=0.003,
                    reward_model=reward_model, ext_coef=0.0, int_coef=1.0, count_beta=0.0, rm_capacity=64,
                    pairs_per_update=8, table_capacity=1024, **kw)
    env = MessageBandit(cfg.num_envs)
    tr = oni.make_trainer(cfg, env, client, network=EncoderActorCritic(env.num_actions, DictMLP()))
    state = tr.init(jax.random.PRNGKey(seed))
    state, metrics = tr.run(state, None, cfg.num_updates)
    traj, _ = tr.collect(state.train_state.params, jax.random.PRNGKey(5 + 1000 * seed))
    return (np.asarray(traj.action) == 2).mean(), metrics, tr


KEY = "You pick up the key."


def caption_key_rate(tmp, labels: dict, seeds=2, updates=120, seed=0):
    """Trains PPO + ONI-retrieval on KeyDoor-5 with no extrinsic reward (ext_coef 0, no count decay) and the
    annotator answering ``labels`` (InstantClient), ``seeds`` seeds vmapped from ``seed`` in the run dir ``tmp``;
    returns "You pick up the key." per ended episode over the last quarter of the run, per seed."""
    table = captions.caption_table("KeyDoor-5")
    cfg = oni.ONIOptions(reward_model="retrieval", ext_coef=0.0, int_coef=1.0, count_beta=0.0)
    loop = oni_captioned.CaptionLoop(cfg, table, InstantClient(labels), seed=seed, every=5)
    snaps = {}

    def hook(state, update, seed_axis=False):
        state = loop(state, update, seed_axis=seed_axis)
        snaps[update] = np.asarray(state.reward_state["model"]["counts"])[:, table.id(KEY)]
        return state
    hook.every = loop.every
    pcfg = ppo.Config(env_name="KeyDoor-5", num_envs=16, num_steps=32, total_timesteps=16 * 32 * updates,
                      learning_rate=1e-3, ent_coef=0.01)
    reward = oni_captioned.make_reward(cfg, table)
    make = lambda c, log_fn=None, log_every=1: ppo.make_trainer(c, reward, log_fn, log_every, chunk_hook=hook)  # noqa
    res = run_experiment(make, pcfg, run_dir=tmp, num_seeds=seeds, seed=seed, log_every=10, checkpoint_every=updates,
                         progress=False, tensorboard=False, plot=False)
    start = updates - updates // 4
    episodes = res.metrics["episodes"][:, start:].sum(1)
    return (snaps[updates] - snaps[start]) / episodes
