"""Reward factors: named per-step quantities a user ranks by importance (HERON).

A :class:`FactorSet` turns one env step into a vector of named factors. Each factor has

* a direction: ``+1`` if more is better (goal reached, gold), ``-1`` if less is better (energy, damage);
* an aggregation over a trajectory or segment: ``"sum"`` (energy spent) or ``"max"`` (deepest level reached);
* a ground-truth weight, used only by baselines (the hand-made weighted-sum reward HERON is compared against).

Factor functions take a :class:`Step` and return ``{name: array}`` with any leading batch shape. JAX tasks read the
env state (``state``/``next_state``); host envs (NetHack) read observations (``obs``/``next_obs``) and ``info``.

Getting factors out of an env:

* :class:`FactorEnv` wraps a gymnax-style base env (``step_env``/``reset_env``) so that every step reports
  ``info["factors"]`` (``[..., K]``, in the set's order) and, on the step an episode ends (terminated or
  truncated), ``info["episode_factor_<name>"]`` with the episode's aggregate (0 on other steps) -- logged by the
  agents like ``episode_return``. Registered factor envs: :data:`FACTOR_ENVS` (``envs.make("PendulumFactors-v1")``);
  an env's factor set is its registry entry's (``envs.entry(name).factors``, :func:`factor_set_for`).
* :meth:`FactorSet.from_transition` computes factors after the fact from a rollout's
  :class:`~jaxrl_pref.rollout.Transition` (obs, action, true next obs, info) -- how host envs such as the NetHack
  pool get them (see :data:`MINIHACK`).

The reward transforms that read factors (:class:`~jaxrl_pref.rewards.factors.FactorReward`, HERON's preference
model) live in ``jaxrl_pref.rewards``, which imports this module (``envs`` imports nothing of ``jaxrl_pref``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from envs import registry

AGGREGATIONS = ("sum", "max")


@struct.dataclass
class Step:
    """What a factor function may read about one env step (fields a source cannot provide are ``None``)."""
    action: Any = None
    reward: Any = None
    terminated: Any = None
    obs: Any = None
    next_obs: Any = None
    state: Any = None
    next_state: Any = None
    info: Any = None
    params: Any = struct.field(pytree_node=False, default=None)


@dataclasses.dataclass(frozen=True)
class Factor:
    name: str
    direction: int = 1
    """+1: larger is better; -1: smaller is better."""
    aggregate: str = "sum"
    """How steps combine into a trajectory/segment value: 'sum' or 'max'."""
    weight: float = 0.0
    """Ground-truth weight of the factor's raw value in the task's hand-designed reward (baselines only)."""
    doc: str = ""

    def __post_init__(self):
        if self.direction not in (1, -1):
            raise ValueError(f"factor {self.name!r}: direction must be +1 or -1, got {self.direction}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"factor {self.name!r}: aggregate must be one of {AGGREGATIONS}, got {self.aggregate!r}")


@dataclasses.dataclass(frozen=True)
class FactorSet:
    """Named factors of one task and the function computing them from a :class:`Step`."""
    name: str
    factors: tuple[Factor, ...]
    fn: Callable[[Step], Mapping[str, jax.Array]]
    default_ranking: tuple[str, ...] = ()
    """The ranking HERON uses when the user gives none (highest priority first)."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def directions(self) -> jax.Array:
        return jnp.array([f.direction for f in self.factors], jnp.float32)

    @property
    def weights(self) -> jax.Array:
        return jnp.array([f.weight for f in self.factors], jnp.float32)

    def __call__(self, step: Step) -> jax.Array:
        """Factor vector ``[..., K]`` (float32) in the order of :attr:`names`."""
        out = self.fn(step)
        missing = [n for n in self.names if n not in out]
        if missing:
            raise KeyError(f"factor set {self.name!r}: function did not return {missing}")
        return jnp.stack([jnp.asarray(out[n], jnp.float32) for n in self.names], axis=-1)

    def from_transition(self, traj) -> jax.Array:
        """Factors ``[T, N, K]`` of a rollout (host envs): reads obs, action, reward, terminated, the true next
        observation (``final_obs``) and info."""
        return self(Step(action=traj.action, reward=traj.reward, terminated=traj.terminated, obs=traj.obs,
                         next_obs=traj.final_obs, info=traj.info))

    def aggregate(self, factors: jax.Array, axis: int = -2) -> jax.Array:
        """Aggregates per-step factors ``[..., L, K]`` over ``axis`` (each factor by its own rule) -> ``[..., K]``."""
        summed, maxed = factors.sum(axis), factors.max(axis)
        use_max = jnp.array([f.aggregate == "max" for f in self.factors])
        return jnp.where(use_max, maxed, summed)

    def ranking(self, order: Sequence[str] | None = None) -> tuple[int, ...]:
        """Indices of the ranked factors (highest first). Unknown names raise ``KeyError`` naming the valid ones."""
        order = tuple(order) if order else (self.default_ranking or self.names)
        bad = [n for n in order if n not in self.names]
        if bad:
            raise KeyError(f"unknown factor(s) {bad} for {self.name}; known: {list(self.names)}")
        if len(set(order)) != len(order):
            raise KeyError(f"factor ranking {list(order)} names a factor twice")
        return tuple(self.index(n) for n in order)


def parse_ranking(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"goal>energy"`` or ``["goal", "energy"]`` -> ``("goal", "energy")``."""
    if isinstance(text, str):
        parts = text.split(">")
    else:
        parts = [p for t in text for p in str(t).split(">")]
    return tuple(p.strip() for p in parts if p.strip())


# -- the env wrapper -----------------------------------------------------------------------------------------------

@struct.dataclass
class FactorEnvState:
    env_state: Any
    acc: jax.Array  # this episode's running aggregate per factor, [K]


class FactorEnv:
    """Wraps a gymnax base env (``step_env``/``reset_env``/``is_truncated``) to report factors in ``info``.

    Per step: ``info["factors"]`` (``[K]``, the set's order). On the step an episode ends (natural termination
    or the env's time limit): ``info["episode_factor_<name>"]`` = the episode's aggregate, 0 otherwise. Other
    attributes (spaces, ``default_params``...) are those of the wrapped env.
    """

    def __init__(self, env, factor_set: FactorSet):
        self._env, self.factor_set = env, factor_set

    def __getattr__(self, name):
        return getattr(self._env, name)

    def _init_acc(self):
        k = len(self.factor_set)
        neg = jnp.array([f.aggregate == "max" for f in self.factor_set.factors])
        return jnp.where(neg, -jnp.inf, jnp.zeros((k,), jnp.float32)).astype(jnp.float32)

    def reset_env(self, key, params):
        obs, state = self._env.reset_env(key, params)
        return obs, FactorEnvState(state, self._init_acc())

    def step_env(self, key, state: FactorEnvState, action, params):
        obs, env_state, reward, terminated, info = self._env.step_env(key, state.env_state, action, params)
        f = self.factor_set(Step(action=action, reward=reward, terminated=terminated, next_obs=obs,
                                 state=state.env_state, next_state=env_state, info=info, params=params))
        use_max = jnp.array([x.aggregate == "max" for x in self.factor_set.factors])
        acc = jnp.where(use_max, jnp.maximum(state.acc, f), state.acc + f)
        ended = jnp.asarray(terminated, bool) | jnp.asarray(self._env.is_truncated(env_state, params), bool)
        info = dict(info)
        info["factors"] = f
        for i, name in enumerate(self.factor_set.names):
            info[f"episode_factor_{name}"] = jnp.where(ended, acc[i], 0.0)
        acc = jnp.where(ended, self._init_acc(), acc)
        return obs, FactorEnvState(env_state, acc), reward, terminated, info

    def is_truncated(self, state: FactorEnvState, params):
        return self._env.is_truncated(state.env_state, params)

    def is_terminal(self, state: FactorEnvState, params):
        return self._env.is_terminal(state.env_state, params)

    def get_obs(self, state: FactorEnvState, *args, **kwargs):
        return self._env.get_obs(state.env_state, *args, **kwargs)


# -- factor sets ---------------------------------------------------------------------------------------------------

def _mountain_car(s: Step):
    p, nxt = s.params, s.next_state
    force = jnp.clip(jnp.reshape(s.action, ()), p.min_action, p.max_action)
    goal = (nxt.position >= p.goal_position) & (nxt.velocity >= p.goal_velocity)
    # mechanical energy per unit mass (kinetic + potential of the 1/3 sin(3x) hill), conserved when unforced
    swing = 0.5 * nxt.velocity ** 2 + p.gravity / 3.0 * jnp.sin(3.0 * nxt.position)
    return {"goal": goal.astype(jnp.float32),
            "energy": force ** 2,
            "progress": nxt.position - s.state.position,
            "swing": swing * 1000.0}


MOUNTAIN_CAR = FactorSet(
    "MountainCarContinuous",
    (Factor("goal", +1, "sum", 100.0, "1 on the step the car reaches the flag"),
     Factor("energy", -1, "sum", -0.1, "squared (clipped) force"),
     Factor("progress", +1, "sum", 0.0, "change in position (sums to net displacement)"),
     Factor("swing", +1, "max", 0.0, "mechanical energy x1000 (kinetic + potential); max over the segment")),
    _mountain_car,
    default_ranking=("goal", "energy"),
)
"""gymnax MountainCarContinuous-v0: reward = 100 * goal - 0.1 * energy; the paper's ranking goal > energy."""


def _angle_normalize(x):
    return ((x + jnp.pi) % (2 * jnp.pi)) - jnp.pi


def _pendulum(s: Step):
    p, st = s.params, s.state
    u = jnp.clip(jnp.reshape(s.action, ()), -p.max_torque, p.max_torque)
    # gymnax Pendulum's cost is computed on the state *before* the step
    return {"angle": _angle_normalize(st.theta) ** 2,
            "speed": st.theta_dot ** 2,
            "energy": u ** 2,
            "upright": (jnp.cos(s.next_state.theta) > 0.95).astype(jnp.float32)}


PENDULUM = FactorSet(
    "Pendulum",
    (Factor("angle", -1, "sum", -1.0, "squared angle from upright"),
     Factor("speed", -1, "sum", -0.1, "squared angular velocity"),
     Factor("energy", -1, "sum", -0.001, "squared (clipped) torque"),
     Factor("upright", +1, "sum", 0.0, "1 while within ~18 degrees of upright")),
    _pendulum,
    default_ranking=("angle", "speed", "energy"),
)
"""gymnax Pendulum-v1: reward = -(angle + 0.1 speed + 0.001 energy)."""


# NetHack bottom-line statistics (NLE ``blstats``) indices used below.
BL_HP, BL_DEPTH, BL_GOLD, BL_TIME = 10, 12, 13, 20


def _minihack(s: Step):
    b0 = jnp.asarray(s.obs["blstats"], jnp.float32)
    b1 = jnp.asarray(s.next_obs["blstats"], jnp.float32)
    return {"depth": b1[..., BL_DEPTH],
            "gold": jnp.maximum(b1[..., BL_GOLD] - b0[..., BL_GOLD], 0.0),
            "damage": jnp.maximum(b0[..., BL_HP] - b1[..., BL_HP], 0.0),
            "steps": jnp.maximum(b1[..., BL_TIME] - b0[..., BL_TIME], 0.0)}


MINIHACK = FactorSet(
    "MiniHack",
    (Factor("depth", +1, "max", 1.0, "dungeon depth reached (blstats[12])"),
     Factor("gold", +1, "sum", 0.01, "gold picked up (increase of blstats[13])"),
     Factor("damage", -1, "sum", -0.01, "hit points lost (decrease of blstats[10])"),
     Factor("steps", -1, "sum", -0.001, "game turns elapsed (increase of blstats[20])")),
    _minihack,
    default_ranking=("depth", "damage", "gold", "steps"),
)
"""NetHack/MiniHack from bottom-line stats: read ``obs["blstats"]`` before and after each step (the true next
observation, before any auto-reset). Apply with :meth:`FactorSet.from_transition` to host-env rollouts."""

FACTOR_SETS: dict[str, FactorSet] = {"MountainCarContinuous": MOUNTAIN_CAR, "Pendulum": PENDULUM,
                                     "MiniHack": MINIHACK}

FACTOR_ENVS: dict[str, tuple[str, FactorSet]] = {
    "MountainCarContinuousFactors-v0": ("MountainCarContinuous-v0", MOUNTAIN_CAR),
    "PendulumFactors-v1": ("Pendulum-v1", PENDULUM),
}
"""Registered JAX factor envs: name -> (gymnax base env, factor set). Each behaves exactly as its base env (same
reward, dynamics and time limit) and adds factors to ``info``."""


def make_factor_env(base_name: str, factor_set: FactorSet, **param_overrides):
    """``(FactorEnv, params)`` for a gymnax env id (the registry factory used by ``envs``)."""
    import gymnax
    env, params = gymnax.make(base_name)
    fields = {f.name for f in dataclasses.fields(params)}
    unknown = set(param_overrides) - fields
    if unknown:
        raise ValueError(f"env kwargs: {sorted(unknown)} are not parameters of {base_name}; valid: {sorted(fields)}")
    return FactorEnv(env, factor_set), params.replace(**param_overrides)


def register_all(register) -> None:
    """Registers :data:`FACTOR_ENVS` with :func:`envs.register` and marks each one's gymnax base env with its factor
    set and factor env (``Pendulum-v1`` -> ``PendulumFactors-v1``)."""
    for name, (base, factor_set) in FACTOR_ENVS.items():
        register(name, functools.partial(make_factor_env, base, factor_set), family="factors", factors=factor_set,
                 factor_env=name)
        registry.update(base, factors=factor_set, factor_env=name)


def factor_set_for(env_name: str) -> Optional[FactorSet]:
    """The factor set of an env (its registry entry's: a factor env, its base env, a NetHack/MiniHack task), else
    ``None`` (also for an unknown id)."""
    entry = registry.find(env_name)
    return None if entry is None else entry.factors


def factor_env_name(env_name: str) -> str:
    """The registered factor env for ``env_name`` (itself if it already is one or has no JAX factor variant)."""
    entry = registry.find(env_name)
    return entry.factor_env if entry is not None and entry.factor_env else env_name


def factor_envs() -> list[str]:
    """The registered JAX envs that report their factors in ``info``."""
    return [e.name for e in registry.entries() if e.factor_env == e.name]
