"""Environment registry: ``envs.make(name, **kwargs) -> (env, env_params)``.

Every gymnax environment is available by its gymnax id (``CartPole-v1``, ``Pendulum-v1``, ``DeepSea-bsuite``...).
Returned envs follow the 6-value gymnax 1.0 step (see :mod:`envs.wrappers`), auto-reset, report episode statistics
in ``info`` and have flat float32 observations. Other modules add envs with :func:`register`.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import gymnax
from gymnax.environments import spaces

from envs import wrappers
from envs import captions  # per-step info["message_id"] of captioned tasks
from envs.wrappers import (AutoReset, ClipAction, EpisodeStats, FlattenObservation, NormalizeObservation,
                           NormalizeReward)

__all__ = ["make", "register", "registered", "check_name", "spec", "EnvSpec", "wrappers"]

_REGISTRY: dict[str, Callable] = {}


def register(name: str, factory: Callable) -> None:
    """Registers ``factory(**kwargs) -> (base_env, env_params)``; the base env provides ``step_env``/``reset_env``."""
    _REGISTRY[name] = factory


def registered() -> list[str]:
    return sorted(set(gymnax.registered_envs) | set(_REGISTRY) | set(_nethack.registered()))


def check_name(name: str) -> None:
    """Raises :class:`~envs.errors.ConfigError` (field ``env_name``) unless ``name`` is a known env. Cheap:
    builds nothing (xminigrid and Craftax ids need their package installed, and say so)."""
    from envs.errors import ConfigError
    try:
        if name in _craftax.NAMES:  # registered without craftax installed: say so here, importing nothing
            _craftax.check_installed(name)
            return
        if name in _REGISTRY or name in gymnax.registered_envs or _nethack.is_host_env(name):
            return
        _base(name, {})
    except (ValueError, ImportError) as e:
        problem, _, fix = str(e).split(": ", 1)[-1].partition(" Fix: ")
        raise ConfigError("env_name", problem.rstrip("."), fix or f"pick a registered env ({LIST_ENVS})") from None


LIST_ENVS = "python -c 'import envs; print(envs.registered())' lists them; docs/envs.md describes them"


def _base(name: str, kwargs: dict):
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if name not in gymnax.registered_envs:
        if name.startswith(_sparse.XMINIGRID_PREFIX):  # xminigrid's ids register only when it is installed
            _sparse._require_xminigrid(name)
        close = difflib.get_close_matches(name, registered(), n=3)
        hint = f"Did you mean {' or '.join(close)}? Otherwise pick" if close else "Pick"
        raise ValueError(f"env_name: unknown environment {name!r}. Fix: {hint} a registered env ({LIST_ENVS})")
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

    Host envs (``NetHack*-v0``, ``MiniHack-*``; extra ``nle``) return ``(pool, None)``: an
    :class:`envs.nethack.NLEPool` of ``num_envs`` envs (default 1) stepped by worker processes, with the numpy
    host-env interface of :mod:`envs.host` (not jittable); ``kwargs`` are the pool's (``seed``,
    ``num_workers``, ``obs_keys``, ``env_kwargs``...). Close it with ``pool.close()``.
    """
    if _nethack.is_host_env(name):
        if normalize_obs or normalize_reward:
            raise ValueError(f"normalize_obs/normalize_reward: not supported for the host env {name}. "
                             "Fix: leave them False")
        return _nethack.make(name, num_envs=num_envs, **kwargs), None
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
    """Static description of an env's interface, enough to build networks.

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


# The sparse-reward suite (envs/sparse.py): DeepSea-N, Sparse* classic control, KeyDoor-N, SparseFourRooms-v0.
from envs import sparse as _sparse  # noqa: E402

_sparse.register_all(register)

# Craftax (envs/craftax.py, extra "craftax"): registered always, craftax imported only when one is built.
from envs import craftax as _craftax  # noqa: E402

_craftax.register_all(register)

# NetHack/MiniHack host envs (envs/nethack.py): importing it does not import nle.
from envs import nethack as _nethack  # noqa: E402


def _register_factor_envs() -> None:
    """JAX envs that report HERON reward factors in ``info`` (see :mod:`envs.factors`)."""
    from functools import partial

    from envs.factors import FACTOR_ENVS, make_factor_env
    for name, (base, factor_set) in FACTOR_ENVS.items():
        register(name, partial(make_factor_env, base, factor_set))


_register_factor_envs()
