"""Exploration bonuses (RND, E3B) for any agent: ``--bonus rnd|e3b --bonus-coef C`` on every PPO-family CLI.

:class:`BonusConfig` is the option section; :func:`make_bonus` builds the bonus transform
(:class:`~jaxrl_pref.rewards.rnd.RND` or :class:`~jaxrl_pref.rewards.e3b.E3B`) and :class:`WithBonus` adds it to
whatever reward the agent already learns from (the env reward for PPO, HERON's preference reward, ONI's
``ext + int``)::

    r = base(state, traj) + bonus_coef * b / scale

where ``scale`` is RND's own running std of its intrinsic return (RND normalises itself) and, for E3B, a running
std of the bonus (the ONI / HERON intrinsic rewards are normalised the same way).

``--bonus-value-head`` keeps the bonus a stream of its own instead of adding it: the transform returns ``[T, N,
2]`` (base reward, ``bonus_coef * b / scale``), the PPO-family agent learns each with its own value head and return
and follows the sum of their advantages (:class:`~jaxrl_pref.rewards.transform.Stream`). RND's stream is then
non-episodic with discount ``bonus_gamma``: its return runs on across episode ends, as in Burda et al.; E3B's bonus
is per episode by construction, so its stream stays episodic. Everything lives in the
transform's state, so it runs inside the jitted loop (vmapped over seeds), in the host loop (NetHack/MiniHack
pool), and checkpoints and resumes with the rest of the runner state.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxrl_pref.config import in_range, positive, require
from jaxrl_pref.rewards.transform import (SINGLE, IdentityReward, Stream, reward_streams, running_var,
                                          update_and_reward)

BONUSES = ("none", "rnd", "e3b")


@dataclasses.dataclass(frozen=True)
class BonusConfig:
    """Exploration bonus added to the agent's reward: none, rnd (Random Network Distillation) or e3b (elliptical
    episodic bonus); docs/exploration.md."""
    bonus: str = "none"
    """Exploration bonus: none, rnd or e3b."""
    bonus_coef: float = 0.01
    """Coefficient of the normalised bonus added to the reward."""
    bonus_learning_rate: float = 1e-4
    """Adam learning rate of the RND predictor / the E3B inverse-dynamics model."""
    bonus_hidden: tuple[int, ...] = (64, 64)
    """Hidden layers of the RND target/predictor or of the E3B embedding."""
    bonus_features: int = 64
    """RND output width / E3B embedding size."""
    e3b_ridge: float = 0.1
    """E3B: the ridge lambda of C = lambda I + sum phi phi^T (the bonus of a first state is |phi|^2 / lambda)."""
    bonus_value_head: bool = False
    """Learn the bonus with its own value head and return instead of adding it to the reward; RND's return is then
    non-episodic (runs on across episode ends, Burda et al.), E3B's stays per episode."""
    bonus_gamma: float = 0.99
    """Discount of the bonus's return: RND's normalising return, and the bonus stream's with --bonus-value-head."""

    def __post_init__(self):
        require(self.bonus in BONUSES, "bonus", f"unknown bonus {self.bonus!r}", f"use one of {', '.join(BONUSES)}")
        positive(self, "bonus_coef", strict=False)
        positive(self, "bonus_learning_rate", "bonus_features", "e3b_ridge")
        in_range(self, "bonus_gamma", 0.0, 1.0)
        require(not self.bonus_value_head or self.bonus != "none", "bonus_value_head",
                "a value head for the bonus needs a bonus", "pass --bonus rnd or --bonus e3b, or drop --bonus-value-head")
        require(len(self.bonus_hidden) > 0 and all(h > 0 for h in self.bonus_hidden), "bonus_hidden",
                f"layer sizes must be positive, got {self.bonus_hidden}", "pass e.g. --bonus-hidden 64 64")


def make_bonus(cfg: BonusConfig, num_envs: int):
    """The bonus transform of ``cfg`` (``None`` for ``bonus="none"``); ``num_envs``: the envs one call of the
    transform sees (per device under data parallelism; E3B keeps a matrix per env)."""
    from jaxrl_pref.rewards.e3b import E3B
    from jaxrl_pref.rewards.rnd import RND
    if cfg.bonus == "rnd":
        return RND(hidden=cfg.bonus_hidden, features=cfg.bonus_features, learning_rate=cfg.bonus_learning_rate,
                   gamma_int=cfg.bonus_gamma)
    if cfg.bonus == "e3b":
        return E3B(num_envs, hidden=cfg.bonus_hidden, features=cfg.bonus_features, ridge=cfg.e3b_ridge,
                   learning_rate=cfg.bonus_learning_rate)
    return None


def with_bonus(base, cfg: BonusConfig, num_envs: int):
    """``base`` (a reward transform, or ``None`` for the env reward) plus ``cfg``'s bonus; ``base`` unchanged when
    there is none."""
    bonus = make_bonus(cfg, num_envs)
    if bonus is None:
        return base
    stream = None
    if cfg.bonus_value_head:
        stream = Stream(cfg.bonus, episodic=cfg.bonus != "rnd", gamma=cfg.bonus_gamma)
    return WithBonus(base if base is not None else IdentityReward(), bonus, cfg.bonus_coef,
                     normalize=cfg.bonus != "rnd", stream=stream)


class WithBonus:
    """A reward transform: ``base``'s reward plus ``coef`` times a bonus transform's output (divided by a running
    std of it when ``normalize``). State ``{"base", "bonus", "var"}``; ``base``'s state is ``state["base"]``.

    ``stream``: return the bonus as a second reward stream instead of adding it (``[T, N, 2]``: base reward, scaled
    bonus; ``streams`` says how the agent learns each)."""

    def __init__(self, base, bonus, coef: float, normalize: bool = True, momentum: float = 0.99,
                 stream: Optional[Stream] = None):
        self.base, self.bonus, self.coef, self.normalize, self.momentum = base, bonus, coef, normalize, momentum
        self.streams = None
        if stream is not None:
            if reward_streams(base) != SINGLE:
                raise ValueError(f"WithBonus: the base reward {type(base).__name__} already has several streams; "
                                 "a bonus stream goes on a single-stream reward")
            self.streams = (Stream("extrinsic"), stream)

    def init(self, key, spec):
        k1, k2 = jax.random.split(key)
        return {"base": self.base.init(k1, spec), "bonus": self.bonus.init(k2, spec), "var": jnp.float32(1.0)}

    def resizable(self, path: str) -> bool:
        return bool(getattr(self.base, "resizable", lambda p: False)(path))

    def update(self, state, traj, key, axis_name: Optional[str] = None):
        k1, k2 = jax.random.split(key)
        base, m1 = self.base.update(state["base"], traj, k1, axis_name)
        bonus, m2 = self.bonus.update(state["bonus"], traj, k2, axis_name)
        var = state["var"]
        if self.normalize:
            b, _ = self.bonus(bonus, traj)
            var = running_var(var, b, self.momentum, axis_name)
        return {"base": base, "bonus": bonus, "var": var}, {**m1, **m2}

    def __call__(self, state, traj):
        reward, m1 = self.base(state["base"], traj)
        b, m2 = self.bonus(state["bonus"], traj)
        return self._combine(state, reward, b, {**m1, **m2})

    def update_and_reward(self, state, traj, key, axis_name: Optional[str] = None):
        k1, k2 = jax.random.split(key)
        base, reward, m1 = update_and_reward(self.base, state["base"], traj, k1, axis_name)
        bonus, b, m2 = update_and_reward(self.bonus, state["bonus"], traj, k2, axis_name)
        var = running_var(state["var"], b, self.momentum, axis_name) if self.normalize else state["var"]
        state = {"base": base, "bonus": bonus, "var": var}
        reward, metrics = self._combine(state, reward, b, {**m1, **m2})
        return state, reward, metrics

    def _combine(self, state, reward, b, metrics):
        if self.normalize:
            b = b / jnp.sqrt(state["var"] + 1e-8)
        metrics = {**metrics, "reward/bonus": (self.coef * b).mean()}
        if self.streams is not None:
            return jnp.stack([reward, self.coef * b], axis=-1), metrics
        return reward + self.coef * b, metrics
