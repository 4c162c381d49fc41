"""The training loops: one owner for the scanned (Anakin) loop and the host-env (Sebulba) loop of every agent.

Agents provide pure pieces; this module runs them and owns logging, sharding, host rollouts and timing:

* :class:`ScanLoop` -- ``init(key, hp)`` and ``run(state, hp, num_updates) -> (state, metrics)``: a ``lax.scan``
  of the agent's jittable ``step(state, hp, axis_name) -> (state, metrics)``, with ``log_fn(step, metrics)``
  called on the host (``jax.debug.callback``) every ``log_every`` updates and, with ``num_devices > 1``, a
  ``shard_map`` over a 1-D device mesh (:mod:`jaxrl_pref.distributed`; the agent averages gradients over
  ``axis_name``). Pure and jittable (``num_updates`` static); vmappable over seeds and hyperparameters on one
  device.
* :func:`host_rollout` -- steps a host env (the numpy interface documented in :mod:`envs.host`) with a jitted
  policy for up to ``num_steps`` steps: env groups pipelined (``send``/``recv``), the final-observation merge,
  optionally stopping once every env's first episode has ended. Returns time-major ``[T, N]`` numpy columns.
* :class:`HostLoop` -- ``run(state, hp, num_updates)`` over host iterations: collect -> host hook -> learn, the next
  collection optionally overlapped with learning (a background thread), timing and logging, metrics stacked to
  ``[num_updates]`` numpy arrays. ``jittable = False``: the runner calls ``run`` as plain Python.
"""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_pref import distributed
from jaxrl_pref.recurrent import RecurrentState

LogFn = Callable[[Any, dict], None]  # (update_step, metrics) -> None, called on the host


# -- the scanned (Anakin) loop ---------------------------------------------------------------------------------------

class ScanLoop:
    """``init(key, hp)`` / ``run(state, hp, num_updates)`` over an agent's pure ``init`` and ``step``.

    Args:
      init: ``init(key, hp, axis_name) -> state`` (``axis_name`` is the device axis under ``shard_map``, else None).
      step: ``step(state, hp, axis_name) -> (state, metrics)``, one update, jittable.
      hparams: ``hparams() -> hp``, the defaults used when ``hp`` is None.
      count: ``count(state) -> int array``, updates done (the step passed to ``log_fn``).
      num_devices: > 1 runs under ``shard_map``; ``state_specs`` is then the state's pytree-prefix of partition
        specs (:data:`~jaxrl_pref.distributed.SPLIT` / ``REPLICATED``).

    With ``num_devices > 1`` run seeds one after another: vmapping a shard_map'd loop is rejected by jax 0.10's
    varying-axes checker, and vmapping inside the device map deadlocks XLA:CPU's in-process all-reduce on forced
    host devices (seen with 4 devices on 2 cores).
    """

    def __init__(self, init: Callable, step: Callable, hparams: Callable[[], Any], count: Callable, *,
                 log_fn: Optional[LogFn] = None, log_every: int = 1, num_devices: int = 1, state_specs: Any = None):
        self._init_fn, self._step_fn, self._hparams, self._count = init, step, hparams, count
        self.log_fn, self.log_every = log_fn, log_every
        self.mesh = distributed.data_mesh(num_devices) if num_devices > 1 else None
        self.axis = distributed.DATA_AXIS if self.mesh is not None else None
        self.state_specs = state_specs

    def init(self, key, hp=None):
        hp = self._hparams() if hp is None else hp
        if self.mesh is None:
            return self._init_fn(key, hp, self.axis)
        body = lambda k, h: self._init_fn(k, h, self.axis)  # noqa: E731
        return distributed.shard(body, self.mesh, in_specs=(None, None), out_specs=self.state_specs)(key, hp)

    def run(self, state, hp=None, num_updates: int = 1):
        hp = self._hparams() if hp is None else hp
        if self.mesh is None:
            return self._scan(state, hp, num_updates)
        body = partial(self._scan, num_updates=num_updates)
        return distributed.shard(body, self.mesh, in_specs=(self.state_specs, None),
                                 out_specs=(self.state_specs, None))(state, hp)

    def _scan(self, state, hp, num_updates: int):
        return jax.lax.scan(lambda s, _: self._step(s, hp), state, None, length=num_updates)

    def _step(self, state, hp):
        state, metrics = self._step_fn(state, hp, self.axis)
        if self.log_fn is not None:
            self._log(self._count(state), metrics)
        return state, metrics

    def _log(self, step, metrics):
        fn = self.log_fn
        if self.axis is not None:  # every device holds the same averaged metrics: log device 0's only
            first = jax.lax.axis_index(self.axis) == 0
            cb = lambda s, m, f: fn(s, m) if f else None  # noqa: E731
            do = lambda: jax.debug.callback(cb, step, metrics, first)  # noqa: E731
        else:
            do = lambda: jax.debug.callback(fn, step, metrics)  # noqa: E731
        jax.lax.cond(step % self.log_every == 0, do, lambda: None)


# -- host rollouts ---------------------------------------------------------------------------------------------------

class HostSteps(NamedTuple):
    """Time-major ``[T, N]`` numpy columns of a host rollout. ``extras``: the policy's further outputs (e.g. PPO's
    log-probabilities and values), stacked likewise; ``final_obs``: the true observation each step led to (the
    episode's last one where it ended, else the next observation); ``info``: the env's ``episode_*`` statistics;
    ``policy_state``: a recurrent policy's state entering each step (``()`` without one)."""
    obs: Any
    action: np.ndarray
    extras: tuple
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: Any
    info: dict
    policy_state: Any = ()
    last_obs: Any = None
    """With ``upload``: the device copy of the observations after the last step (for the bootstrap value)."""


def env_groups(env) -> int:
    """How many groups a host env pipelines (``num_groups`` with ``send``/``recv``), else 1."""
    return getattr(env, "num_groups", 1) if hasattr(env, "send") else 1


def merge_final_obs(final, next_obs, done):
    """The true observation a step led to: ``final`` (the env's ``info["final_obs"]``) where an episode ended,
    ``next_obs`` (already the reset one there) elsewhere."""
    if not done.any():  # nothing ended: the true next observation is next_obs (stacking copies it)
        return next_obs
    return jax.tree.map(lambda f, n: np.where(done.reshape(done.shape + (1,) * (n.ndim - 1)), f, n), final, next_obs)


def host_rollout(env, policy: Callable, obs, num_steps: int, groups: int = 1, until_first_episodes_end: bool = False,
                 policy_state: Any = None, upload: Optional[Callable] = None) -> tuple:
    """Steps host env ``env`` from observations ``obs`` for ``num_steps`` steps. Returns ``(steps, last_obs)``.

    ``policy(obs, t, g) -> (action, *extras)`` acts on group ``g``'s observations at step ``t`` (a jitted call:
    its outputs may stay device arrays; the action is fetched to send it). With ``groups > 1`` (an env with
    ``num_groups`` and ``send``/``recv``, e.g. ``NLEPool(num_groups=2)``) the groups are stepped round-robin:
    group ``g`` is sent its next actions as soon as its results are in, while the others step; the columns hold
    the groups side by side along the env axis. ``until_first_episodes_end`` (one group only) stops early, after
    the step where the last env's first episode ended (the columns are then shorter than ``num_steps``).

    A recurrent policy: pass its state for all envs (a :class:`~jaxrl_pref.recurrent.RecurrentState` with a
    leading env axis) as ``policy_state``; ``policy(obs, t, g, state) -> (action, carry, *extras)`` then gets
    group ``g``'s state, the state entering each step is stored in ``steps.policy_state``, the next one is
    ``RecurrentState(carry, done)``, and ``(steps, last_obs, policy_state)`` is returned.

    ``upload(obs, t, g, start) -> device obs`` moves group ``g``'s observations for step ``t`` to the device in one
    transfer (e.g. packed by :class:`~jaxrl_pref.transfer.ObsPacker`; ``start``: a recurrent policy's reset flags
    for that step, else None; ``t == num_steps`` for the observations after the last step). Each step's
    observations then go up once, as soon as the env returns them: the policy gets the device copy, and
    ``steps.obs``, ``steps.final_obs`` and ``steps.last_obs`` are device arrays stacked from those uploads (a step
    where an episode ended uploads its final observation too; elsewhere the final observation is the next step's
    upload), so the update re-uploads no observation. ``last_obs`` (returned) stays the host copy.
    """
    G = groups
    if G > 1:
        send, recv = env.send, env.recv
    else:
        sent = [None]

        def send(actions, group):
            sent[0] = actions

        def recv(group):
            return env.step(sent[0])
    if until_first_episodes_end and G != 1:
        raise ValueError("host_rollout: until_first_episodes_end needs groups=1")
    B = env.num_envs // G
    obs = [{k: x[g * B:(g + 1) * B] for k, x in obs.items()} for g in range(G)]
    rec = policy_state is not None
    ps = [jax.tree.map(lambda x: x[g * B:(g + 1) * B], policy_state) if rec else () for g in range(G)]
    buf = [{f: [] for f in HostSteps._fields} for _ in range(G)]
    acted = [None] * G
    running = np.ones(env.num_envs, bool)
    up = upload is not None
    start = lambda g: np.asarray(ps[g].start) if rec else None  # noqa: E731
    seen = [upload(obs[g], 0, g, start(g)) for g in range(G)] if up else obs  # what the policy sees

    def act(g, t):
        if rec:
            action, carry, *extras = policy(seen[g], t, g, ps[g])
        else:
            (action, *extras), carry = policy(seen[g], t, g), None
        action = np.asarray(action)
        send(action, g)
        acted[g] = (action, tuple(extras), carry)

    for g in range(G):
        act(g, 0)
    for t in range(num_steps):
        for g in range(G):
            next_obs, reward, terminated, truncated, info = recv(g)
            done = np.logical_or(terminated, truncated)
            final_obs = merge_final_obs(info.pop("final_obs"), next_obs, done)
            action, extras, carry = acted[g]
            if up:
                next_seen = upload(next_obs, t + 1, g, done if rec else None)
                final_obs = next_seen if final_obs is next_obs else upload(final_obs, t + 1, g, None)
            for k, v in (("obs", seen[g]), ("action", action), ("extras", extras), ("reward", reward),
                         ("terminated", terminated), ("truncated", truncated), ("final_obs", final_obs),
                         ("info", {k: v for k, v in info.items() if k.startswith("episode_")}),
                         ("policy_state", ps[g])):
                buf[g][k].append(v)
            obs[g] = next_obs
            seen[g] = next_seen if up else next_obs
            if rec:
                ps[g] = RecurrentState(carry, done)
            if until_first_episodes_end:
                running &= ~done
                if not running.any():
                    break
            if t + 1 < num_steps:
                act(g, t + 1)
        if not running.any():  # (until_first_episodes_end) every env's first episode is over
            break
    last_obs = obs[0] if G == 1 else {k: np.concatenate([o[k] for o in obs]) for k in obs[0]}
    # [T, B] per group -> [T, N]: groups side by side along the env axis (the uploads stacked on the device)
    on_device = {"obs", "final_obs"} if up else set()
    stack = lambda xs, xp: jax.tree.map(lambda *a: xp.stack([xp.asarray(x) for x in a]), *xs)  # noqa: E731

    def cat(k):
        xp = jnp if k in on_device else np
        if G == 1:
            return stack(buf[0][k], xp)
        return jax.tree.map(lambda *a: xp.concatenate(a, axis=1), *[stack(b[k], xp) for b in buf])
    steps = HostSteps(*(cat(f) for f in HostSteps._fields if f != "last_obs"),
                      last_obs=(seen[0] if G == 1 else jnp.concatenate(seen)) if up else None)
    if not rec:
        return steps, last_obs
    return steps, last_obs, ps[0] if G == 1 else jax.tree.map(lambda *a: np.concatenate(a), *ps)


# -- the host (Sebulba) loop -----------------------------------------------------------------------------------------

class HostLoop:
    """``run(state, hp, num_updates) -> (state, metrics)`` over host iterations; ``metrics[k]`` is a
    ``[num_updates]`` numpy array. One iteration::

        batch = collect(state, ahead=False)            # host rollout(s) with the current parameters
        state, host_metrics = host_hook(state, batch)  # optional, on the host (e.g. ONI: annotator I/O)
        state, metrics = learn(state, batch)           # jitted update(s)

    With ``overlap=True`` the next batch is collected (``collect(state, ahead=True)``, before the update, i.e. with
    the previous parameters) while ``learn`` runs in a background thread: one update of policy lag. ``count(state)``
    gives the update number passed to ``log_fn`` (every ``log_every``); ``timing(seconds)`` turns an iteration's
    wall time (from the end of the previous one) into metrics. ``hp`` is ignored: host trainers take their
    hyperparameters from their config. ``jittable = False`` tells :func:`jaxrl_pref.runner.run_experiment` to call
    ``run`` as plain Python (one seed per process).
    """
    jittable = False

    def __init__(self, collect: Callable, learn: Callable, count: Callable, timing: Callable[[float], dict], *,
                 log_fn: Optional[LogFn] = None, log_every: int = 1, overlap: bool = False,
                 host_hook: Optional[Callable] = None):
        self._collect_fn, self._learn_fn, self._count, self._timing = collect, learn, count, timing
        self.log_fn, self.log_every, self.overlap, self.host_hook = log_fn, log_every, overlap, host_hook
        self._pending = None

    def run(self, state, hp=None, num_updates: int = 1):
        if isinstance(hp, (int, np.integer)):  # the old run(state, num_updates) would silently run one update
            raise TypeError(f"HostLoop.run(state, hp, num_updates): got hp={hp!r}; pass run(state, None, {hp})")
        history = []
        t0 = time.perf_counter()
        for _ in range(num_updates):
            state, metrics = self._iteration(state)
            metrics.update(self._timing(time.perf_counter() - t0))
            t0 = time.perf_counter()
            history.append(metrics)
            step = self._count(state)
            if self.log_fn is not None and step % self.log_every == 0:
                self.log_fn(step, metrics)
        stacked = {k: np.stack([m[k] for m in history]) for k in history[0]} if history else {}
        return state, stacked

    def _iteration(self, state):
        batch = self._pending if (self.overlap and self._pending is not None) else self._collect_fn(state, False)
        self._pending = None
        host_metrics = {}
        if self.host_hook is not None:
            state, host_metrics = self.host_hook(state, batch)
        if self.overlap:
            box = {}
            th = threading.Thread(target=lambda: box.update(out=jax.block_until_ready(self._learn_fn(state, batch))))
            th.start()
            self._pending = self._collect_fn(state, True)
            th.join()
            state, metrics = box["out"]
        else:
            state, metrics = self._learn_fn(state, batch)
        metrics = jax.tree.map(np.asarray, metrics)
        metrics.update({k: np.float32(v) for k, v in host_metrics.items()})
        return state, metrics
