"""What each env is and can do: one :class:`EnvEntry` per registered env id (or id prefix).

The questions code asks of an env name -- is it stepped on the host (the NetHack/MiniHack pool, the host loop) or in
``jit``; are its steps captioned, with which table; does it report reward factors, from which env; which prompt does
the annotator use; which per-env defaults apply -- are answered by its entry, never by the shape of its name.
:func:`envs.entry` is the lookup (an unknown id raises :class:`~envs.errors.ConfigError` naming the close ones);
:func:`envs.register` adds an entry where each family is defined (``envs/sparse.py``, ``envs/craftax.py``,
``envs/nethack.py``, ``envs/factors.py``; gymnax's ids in ``envs/__init__.py``). Ids that cannot be listed cheaply
(``MiniHack-*`` without importing minihack) are one prefix entry.

This module imports nothing: an entry's captions and factor set are objects of :mod:`envs.captions` and
:mod:`envs.factors`, put there by the module that registers the env.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

__all__ = ["EnvEntry", "add", "update", "find", "entries", "names"]


@dataclasses.dataclass(frozen=True)
class EnvEntry:
    """One registered env (or, with ``prefix``, every id starting with ``name``)."""
    name: str
    family: str = "custom"
    """Who registered it: ``gymnax``, ``sparse``, ``xminigrid``, ``craftax``, ``nethack``, ``minihack``,
    ``factors``; ``custom`` for :func:`envs.register` without one (tests, user code)."""
    factory: Optional[Callable] = None
    """A JAX env: ``factory(**params) -> (base_env, env_params)``. A host env: ``factory(name, num_envs=...,
    **kwargs) -> pool`` (:mod:`envs.host`'s interface)."""
    host: bool = False
    """Stepped on the host by a worker pool (numpy in and out, not jittable): the agents' host loop."""
    captions: Any = None
    """The :class:`envs.captions.Captions` of a captioned task (``info["message_id"]`` on every step), else None."""
    factors: Any = None
    """The :class:`envs.factors.FactorSet` of the env's reward factors (HERON), else None."""
    factor_env: Optional[str] = None
    """The env whose steps report ``factors`` in ``info`` (a factor env: itself; ``Pendulum-v1``:
    ``PendulumFactors-v1``); None where they are computed from transitions (host envs) or there are none."""
    task: Optional[str] = None
    """The annotator's prompt task (``jaxrl_pref/annotation/prompts/<task>.v<N>.txt``); None: its generic NetHack
    message prompt."""
    defaults: str = "jax"
    """Which per-env defaults the agents apply: ``host`` (sizes for the worker pool on a few CPU cores, e.g.
    ``agents.ppo.HOST_DEFAULTS``) or ``jax`` (the agents' own)."""
    requires: Optional[Callable[[str], None]] = None
    """``requires(name)`` raises the missing-package error (naming the extra to install) unless the env's optional
    package is installed; it imports nothing heavy. None: nothing to check."""
    prefix: bool = False
    """``name`` is an id prefix (``MiniHack-``): the entry of every id starting with it that has none of its own."""


_ENTRIES: dict[str, EnvEntry] = {}
_PREFIXES: dict[str, EnvEntry] = {}


def add(entry: EnvEntry) -> EnvEntry:
    """Registers ``entry``, replacing an earlier one of the same name."""
    (_PREFIXES if entry.prefix else _ENTRIES)[entry.name] = entry
    return entry


def update(name: str, **fields) -> EnvEntry:
    """Sets ``fields`` on the registered entry ``name`` (a family that extends another one's env: the factor envs
    mark their gymnax base envs)."""
    return add(dataclasses.replace(_ENTRIES[name], **fields))


def find(name: str) -> Optional[EnvEntry]:
    """The entry of ``name``: its own, else the longest prefix entry it starts with; None if it has neither."""
    if name in _ENTRIES:
        return _ENTRIES[name]
    matches = [p for p in _PREFIXES if name.startswith(p)]
    return _PREFIXES[max(matches, key=len)] if matches else None


def entries() -> list[EnvEntry]:
    """Every entry (prefix entries too), by name."""
    return sorted([*_ENTRIES.values(), *_PREFIXES.values()], key=lambda e: e.name)


def names() -> list[str]:
    """The registered ids (not the prefixes)."""
    return sorted(_ENTRIES)
