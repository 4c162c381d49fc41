"""HERON: PPO trained on a preference reward model learned from hierarchical comparisons of ranked reward factors.

HERON = :mod:`agents.ppo` + :class:`jaxrl_pref.rewards.preference.PreferenceReward` plugged in through the
reward-transform seam; this module only wires configuration together (nothing of PPO is copied)::

    from agents import heron
    cfg = heron.Config(env_name="PendulumFactors-v1", factors=("angle", "speed", "energy"), margins=(0, 1, 1))
    out = jax.jit(heron.make_train(cfg))(jax.random.PRNGKey(0))

The env must report reward factors (a registered factor env such as ``PendulumFactors-v1``,
``MountainCarContinuousFactors-v0``; a gymnax id with a factor variant, e.g. ``Pendulum-v1``, is mapped to it).
Any other agent (e.g. the Sebulba host loop for NetHack, with :data:`envs.factors.MINIHACK`) uses the
same model via :func:`reward_model`.

Baselines of the HERON study: :func:`baseline_trainer` gives PPO on the hand-designed weighted-sum reward
(``"weighted"``) or on the top-ranked factor alone (``"top"``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from agents import ppo
from envs.factors import FactorSet, factor_env_name, factor_set_for
from jaxrl_pref.config import ConfigError, require
from jaxrl_pref.rewards.factors import FactorReward
from jaxrl_pref.rewards.preference import PreferenceConfig, PreferenceReward


@dataclasses.dataclass(frozen=True)
class Config(ppo.Config, PreferenceConfig):
    """PPO's configuration plus HERON's reward-model settings."""
    env_name: str = "PendulumFactors-v1"

    def __post_init__(self):
        mapped = factor_env_name(self.env_name)
        if mapped != self.env_name:  # e.g. Pendulum-v1 -> PendulumFactors-v1 (same env, factors in info)
            object.__setattr__(self, "env_name", mapped)
        self.validate()

    def validate(self) -> None:
        fs = factor_set_for(self.env_name)
        require(fs is not None, "env_name", f"{self.env_name!r} reports no reward factors",
                "use a factor env (" + ", ".join(_factor_envs()) + ") or a NetHack/MiniHack task")
        ppo.Config.validate(self)
        self.validate_rm()
        self.resolve(fs)  # unknown factor names, margins length
        self.validate_rollout(self.num_steps, self.num_envs)

    @property
    def factor_set(self) -> FactorSet:
        return factor_set_for(self.env_name)

    def ppo_config(self) -> ppo.Config:
        return ppo.Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ppo.Config)})

    def preference_config(self) -> PreferenceConfig:
        return PreferenceConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PreferenceConfig)})


def _factor_envs():
    from envs.factors import factor_envs
    return factor_envs()


def reward_model(cfg: Config, factor_set: Optional[FactorSet] = None) -> PreferenceReward:
    """The HERON reward transform for ``cfg`` (any agent taking a RewardTransform can use it)."""
    return PreferenceReward(cfg.preference_config() if isinstance(cfg, Config) else cfg,
                            factor_set or cfg.factor_set)


def make_trainer(cfg: Config, log_fn=None, log_every: int = 1) -> ppo.Trainer:
    """The chunked Anakin trainer (for :func:`jaxrl_pref.runner.run_experiment`)."""
    return ppo.make_trainer(cfg.ppo_config(), reward=reward_model(cfg), log_fn=log_fn, log_every=log_every)


def make_train(cfg: Config, log_fn=None, log_every: int = 1):
    """``train(key, hp=None) -> ppo.TrainOutput``; the reward-model state is ``out.runner_state.reward_state``."""
    return ppo.make_train(cfg.ppo_config(), reward=reward_model(cfg), log_fn=log_fn, log_every=log_every)


BASELINES = ("weighted", "top")


def baseline_reward(cfg: Config, kind: str) -> FactorReward:
    """``"weighted"``: the task's hand-designed weighted sum of factors; ``"top"``: the top-ranked factor alone."""
    if kind not in BASELINES:
        raise ConfigError("baseline", f"unknown baseline {kind!r}", f"use one of {BASELINES}")
    fs = cfg.factor_set
    if kind == "weighted":
        return FactorReward(fs)
    order, _ = cfg.resolve(fs)
    return FactorReward.top_factor(fs, fs.names[order[0]])


def baseline_trainer(cfg: Config, kind: str, log_fn=None, log_every: int = 1) -> ppo.Trainer:
    return ppo.make_trainer(cfg.ppo_config(), reward=baseline_reward(cfg, kind), log_fn=log_fn, log_every=log_every)


# -- the study's tasks (experiments.heron_compare; the tests and benchmarks.learning_spread measure pendulum) ------

# Per task: env, PPO settings shared by all methods, HERON ranking and margins.
_PPO = dict(clip_value=False)  # value clipping (+-0.2) stalls the critic on unit-scale rewards; off for every method
TASKS = {
    # PPO settings of the README's Pendulum example (which learns with them); HERON compares 4-step segments,
    # angle first with margin 0 (a margin on the angle lets "hang still" win on speed)
    "pendulum": dict(env_name="PendulumFactors-v1", num_envs=4, num_steps=1024, update_epochs=10,
                     num_minibatches=64, learning_rate=3e-4, gamma=0.9, ent_coef=0.0, normalize_obs=True, **_PPO,
                     factors=("angle", "speed", "energy"), margins=(0.0, 1.0, 1.0), segment_len=4, rm_updates=32),
    "mountaincar": dict(env_name="MountainCarContinuousFactors-v0", num_envs=16, num_steps=128, update_epochs=4,
                        num_minibatches=8, learning_rate=3e-4, gamma=0.99, ent_coef=0.0, normalize_obs=True, **_PPO,
                        factors=("goal", "energy"), margins=(0.0, 1.0), segment_len=8, rm_updates=16),
    # the same task, with the user also ranking a shaping factor (the car's mechanical energy) above action cost
    "mountaincar_swing": dict(env_name="MountainCarContinuousFactors-v0", num_envs=16, num_steps=128,
                              update_epochs=4, num_minibatches=8, learning_rate=3e-4, gamma=0.99, ent_coef=0.0,
                              normalize_obs=True, **_PPO, factors=("goal", "swing", "energy"),
                              margins=(0.0, 0.5, 1.0), segment_len=8, rm_updates=16),
}


def task_config(task: str, total_timesteps: int) -> Config:
    """The :class:`Config` of one of :data:`TASKS` for ``total_timesteps`` env steps."""
    return Config(total_timesteps=total_timesteps, **TASKS[task])
