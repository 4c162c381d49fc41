"""Environment registry: ``envs.make(name, **kwargs) -> (env, env_params)``.

Every gymnax environment is available by its gymnax id (``CartPole-v1``, ``Pendulum-v1``, ``DeepSea-bsuite``...).
Returned envs follow the 6-value gymnax 1.0 step (see :mod:`envs.wrappers`), auto-reset, report episode statistics
in ``info`` and have flat float32 observations. Other modules add envs with :func:`register`.

What an env is and can do (host pool or JAX, captions, reward factors, the annotator's prompt, which defaults apply)
is its :class:`~envs.registry.EnvEntry`: ``envs.entry(name).host``, ``.captions``, ``.factors``, ``.task``...
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Callable

import gymnax
from gymnax.environments import spaces

from envs import registry, wrappers
from envs import captions  # per-step info["message_id"] of captioned tasks
from envs.errors import ConfigError
from envs.registry import EnvEntry
from envs.wrappers import (AutoReset, ClipAction, EpisodeStats, FlattenObservation, NormalizeObservation,
                           NormalizeReward)

__all__ = ["make", "register", "registered", "check_name", "entry", "EnvEntry", "registry", "spec", "EnvSpec",
           "wrappers"]


def register(name: str, factory: Callable | None = None, **fields) -> EnvEntry:
    """Registers the env ``name``: ``factory(**kwargs) -> (base_env, env_params)`` (the base env provides
    ``step_env``/``reset_env``) and what it is and can do, the :class:`~envs.registry.EnvEntry` ``fields``
    (``family``, ``host``, ``captions``, ``factors``, ``factor_env``, ``task``, ``defaults``, ``requires``,
    ``prefix``). A captioned env: ``register(name, factory, captions=Captions(...), task="<prompt>")``."""
    return registry.add(EnvEntry(name, factory=factory, **fields))


def entry(name: str) -> EnvEntry:
    """What the env ``name`` is and can do; an unknown id raises :class:`~envs.errors.ConfigError` (field
    ``env_name``) naming the close ones. A lookup: builds and imports nothing."""
    found = registry.find(name)
    if found is not None and found.prefix and found.requires is not None:
        try:
            found.requires(name)
        except ImportError:
            return found  # its package is missing: checking or building it says so, naming the extra
        found = None  # the package is there and registered its ids one by one: this one is not among them
    if found is None:
        close = difflib.get_close_matches(name, registered(), n=3)
        hint = f"Did you mean {' or '.join(close)}? Otherwise pick" if close else "Pick"
        raise ConfigError("env_name", f"unknown environment {name!r}", f"{hint} a registered env ({LIST_ENVS})")
    return found


def registered() -> list[str]:
    return sorted(set(registry.names()) | set(_nethack.registered()))


def check_name(name: str) -> None:
    """Raises :class:`~envs.errors.ConfigError` (field ``env_name``) unless ``name`` is a known env. Cheap:
    builds nothing (xminigrid and Craftax ids need their package installed, and say so)."""
    found = entry(name)
    try:
        if found.requires is not None:  # registered without its package installed: say so here, importing nothing
            found.requires(name)
    except ImportError as e:
        problem, _, fix = str(e).split(": ", 1)[-1].partition(" Fix: ")
        raise ConfigError("env_name", problem.rstrip("."), fix or f"pick a registered env ({LIST_ENVS})") from None


LIST_ENVS = "python -c 'import envs; print(envs.registered())' lists them; docs/envs.md describes them"


def _base(name: str, kwargs: dict):
    found = entry(name)
    if found.requires is not None:
        found.requires(name)
    return found.factory(**kwargs)


def _gymnax(name: str, **kwargs):
    """The factory of gymnax's own envs: ``kwargs`` override fields of its params."""
    env, params = gymnax.make(name)
    fields = {f.name for f in dataclasses.fields(params)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"env kwargs: {sorted(unknown)} are not parameters of {name}; valid: {sorted(fields)}")
    return env, params.replace(**kwargs)


def make(name: str, *, num_envs: int | None = None, normalize_obs: bool = False, normalize_reward: bool = False,
         gamma: float = 0.99, axis_name: str | None = None, **kwargs):
    """Builds a wrapped env. ``kwargs`` override fields of the env's params (e.g. ``max_steps_in_episode=200``).

    ``axis_name``: the device axis the normalisers average their statistics over when the envs are split across
    devices (the state's :meth:`~envs.wrappers.Wrapper.state_specs` then replicates those statistics).

    ``num_envs=None`` gives one env (``vmap`` it yourself); ``num_envs=N`` gives a batch of N envs whose
    ``reset(key, params)``/``step(key, state, actions, params)`` take one key and carry a leading ``[N]`` axis.

    Host envs (``entry(name).host``: ``NetHack*-v0``, ``MiniHack-*``; extra ``nle``) return ``(pool, None)``: an
    :class:`envs.nethack.NLEPool` of ``num_envs`` envs (default 1) stepped by worker processes, with the numpy
    host-env interface of :mod:`envs.host` (not jittable); ``kwargs`` are the pool's (``seed``,
    ``num_workers``, ``obs_keys``, ``env_kwargs``...). Close it with ``pool.close()``.
    """
    found = entry(name)
    if found.host:
        if normalize_obs or normalize_reward:
            raise ValueError(f"normalize_obs/normalize_reward: not supported for the host env {name}. "
                             "Fix: leave them False")
        return found.factory(name, num_envs=num_envs, **kwargs), None
    env, params = _base(name, kwargs)
    env = captions.wrap(name, env)  # KeyDoor-*, MiniGrid-*, Craftax-*: info["message_id"] (envs/captions.py)
    # a base env may bring its own auto-reset (Craftax: a few fresh worlds per step instead of one per env)
    make_auto_reset = getattr(env, "make_auto_reset", None)  # (wrappers forward it: pass the outermost env)
    env = make_auto_reset(env, num_envs) if make_auto_reset is not None else AutoReset(env, num_envs)
    if isinstance(env.observation_space(params), spaces.Box):
        env = FlattenObservation(env)
    if isinstance(env.action_space(params), spaces.Box):
        env = ClipAction(env)
    env = EpisodeStats(env)  # inside the normalisers: reports the true return
    if normalize_obs:
        env = NormalizeObservation(env, axis_name=axis_name)
    if normalize_reward:
        env = NormalizeReward(env, gamma=gamma, axis_name=axis_name)
    return env, params


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Static description of an env's interface, enough to build networks (what the env can do, by name:
    :func:`entry`).

    ``obs_shape`` is a shape tuple for array observations or a dict ``{key: shape}`` for dict observations
    (host envs such as NetHack), with ``obs_dtype`` matching (a dtype name or a dict of them).
    """
    obs_shape: Any
    discrete: bool
    num_actions: int  # discrete: number of actions; continuous: action dimension
    action_low: tuple | None = None
    action_high: tuple | None = None
    obs_dtype: Any = "float32"

    def dummy_obs(self, batch: int = 1):
        """Zeros shaped like a batch of observations (for network initialisation)."""
        import jax.numpy as jnp
        if isinstance(self.obs_shape, dict):
            return {k: jnp.zeros((batch,) + tuple(s), self.obs_dtype[k]) for k, s in self.obs_shape.items()}
        return jnp.zeros((batch,) + tuple(self.obs_shape), self.obs_dtype)


def spec(env, params) -> EnvSpec:
    import numpy as np
    obs_shape = tuple(env.observation_space(params).shape)
    space = env.action_space(params)
    if isinstance(space, spaces.Discrete):
        return EnvSpec(obs_shape, True, int(space.n))
    if isinstance(space, spaces.Box):
        low = np.broadcast_to(np.asarray(space.low, np.float32), space.shape)
        high = np.broadcast_to(np.asarray(space.high, np.float32), space.shape)
        dim = int(np.prod(space.shape)) if space.shape else 1
        return EnvSpec(obs_shape, False, dim, tuple(low.reshape(-1).tolist()), tuple(high.reshape(-1).tolist()))
    raise TypeError(f"unsupported action space {type(space).__name__}")


# Every family registers its envs with what they can do (envs/registry.py), gymnax's own first: a later family may
# replace an id (the sparse suite) or extend its entry (the factor envs mark their gymnax base env).
for _id in gymnax.registered_envs:
    register(_id, functools.partial(_gymnax, _id), family="gymnax")
del _id

# The sparse-reward suite (envs/sparse.py): DeepSea-N, Sparse* classic control, KeyDoor-N, SparseFourRooms-v0,
# xminigrid's MiniGrid-* ids.
from envs import sparse as _sparse  # noqa: E402

_sparse.register_all(register)

# Craftax (envs/craftax.py, extra "craftax"): registered always, craftax imported only when one is built.
from envs import craftax as _craftax  # noqa: E402

_craftax.register_all(register)

# NetHack/MiniHack host envs (envs/nethack.py): importing it does not import nle.
from envs import nethack as _nethack  # noqa: E402

_nethack.register_all(register)

# JAX envs that report HERON reward factors in ``info`` (envs/factors.py).
from envs import factors as _factors  # noqa: E402

_factors.register_all(register)
