"""Host-side (Sebulba) training loop: envs stepped outside jit (a process pool), the same jitted PPO learner.

A host env is any object with::

    num_envs: int; num_actions: int
    observation_spec() -> {key: (shape, dtype)}          # per-env shapes
    reset() -> obs                                       # dict of numpy arrays [N, ...]
    step(actions) -> (obs, reward, terminated, truncated, info)
        # numpy [N]; info: "final_obs" (dict like obs: the true last observation where an episode ended),
        # "episode_done", "episode_return", "episode_length" and any other "episode_*" statistics, [N] each
    close()
    # optional, for pipelined collection (NLEPool): num_groups: int, send(actions, group), recv(group) -> as step
    # for the group's envs [group * N / num_groups, (group + 1) * N / num_groups)

Each iteration: collect ``num_steps`` steps with the jitted ``act`` -> one jitted ``learn`` (reward-model update,
reward transform, advantages, PPO epochs). With ``overlap=True`` the next rollout is collected with the
previous parameters while ``learn`` runs in a background thread (one update of policy lag, corrected by PPO's
importance ratio since the behaviour log-probs are stored).

With an env of ``num_groups > 1`` (``NLEPool(num_groups=2)``), collection is pipelined: the policy acts on one
group's observations while the workers step the other group, so neither the learner's host thread nor the
workers wait for each other within a rollout. The trajectory is the same ``[num_steps, num_envs]`` batch.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import EnvSpec
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rollout import Transition, episode_metrics


def host_spec(env) -> EnvSpec:
    spec = env.observation_spec()
    return EnvSpec({k: tuple(s) for k, (s, _) in spec.items()}, True, int(env.num_actions),
                   obs_dtype={k: np.dtype(d).name for k, (_, d) in spec.items()})


@struct.dataclass
class HostState:
    """What the host loop carries between updates (device side); a checkpoint is this pytree."""
    train_state: Any
    reward_state: Any
    key: jax.Array
    update_step: jax.Array


class HostTrainer:
    """PPO on a host env. ``init(key) -> HostState``; ``run(state, num_updates) -> (state, metrics)`` where
    metrics is a dict of ``[num_updates]`` numpy arrays (same keys as the Anakin trainer's).

    It also follows :func:`jaxrl_pref.runner.run_experiment`'s trainer protocol (``init(key, hp)``,
    ``run(state, hp, num_updates)``, ``jittable = False``), so host runs get the same chunked checkpoints,
    logging and resume: ``run_experiment(HostTrainer, cfg, trainer_kwargs={"env": pool}, ...)``. ``hp`` is
    ignored there (``None``): the hyperparameters come from ``cfg``."""
    jittable = False  # run() steps host envs: the runner calls it as plain Python

    def __init__(self, cfg, env, reward=None, log_fn: Optional[Callable] = None, log_every: int = 1,
                 overlap: bool = False, network=None, host_hook: Optional[Callable] = None):
        from agents import ppo  # agents depend on jaxrl_pref, not the reverse: imported lazily
        self.cfg, self.env = cfg, env
        self.spec = host_spec(env)
        self.agent = ppo.PPO(cfg, self.spec, network)
        self.hp = ppo.hparams(cfg)
        self.reward = reward if reward is not None else IdentityReward()
        self.log_fn, self.log_every, self.overlap = log_fn, log_every, overlap
        # host_hook(state, traj) -> (state, host_metrics): runs on the host after each rollout, before its update
        # (e.g. ONI: send new messages to the annotator, load new labels into state.reward_state). Its metrics
        # (plain floats) are logged with the update's.
        self.host_hook = host_hook
        # the policy's random draws use XLA's RngBitGenerator (an "rbg" key, 4 uint32 words, made from the rollout
        # key on the host): threefry's bits are a while loop of small ops, which on CPU cost more than the whole
        # forward pass (8 envs: 240 us per act with threefry, 145 us with rbg; 66 us vs 217 us with glyph_dim 8)
        self._act = jax.jit(lambda params, obs, key: self.agent.act(
            params, obs, jax.random.wrap_key_data(key, impl="rbg")))
        self._learn = jax.jit(self._learn_fn)
        self._obs = None
        self._pending = None

    def init(self, key, hp=None) -> HostState:
        k_params, k_reward, k_run = jax.random.split(key, 3)
        return HostState(self.agent.init(k_params, self.hp if hp is None else hp), self.reward.init(k_reward, self.spec), k_run,
                         jnp.int32(0))

    def _learn_fn(self, state: HostState, traj: Transition, last_obs):
        key, k_reward, k_upd = jax.random.split(state.key, 3)
        reward_state, m1 = self.reward.update(state.reward_state, traj, k_reward)
        reward, m2 = self.reward(reward_state, traj)
        params = state.train_state.params
        adv, ret = self.agent.targets(params, self.hp, traj, reward, last_obs)
        train_state, m3 = self.agent.update(state.train_state, self.hp, traj, adv, ret, k_upd)
        metrics = {**episode_metrics(traj.info), **m3, **m1, **m2}
        return HostState(train_state, reward_state, key, state.update_step + 1), metrics

    def collect(self, params, key):
        """One rollout of ``num_steps`` host steps with the jitted policy. Returns (traj, last_obs).

        Groups (see the module docstring) are stepped round-robin: group ``g`` is sent its next actions as soon
        as its results are in, and the others step meanwhile."""
        env, T = self.env, self.cfg.num_steps
        G = getattr(env, "num_groups", 1) if hasattr(env, "send") else 1
        send, recv = (env.send, env.recv) if G > 1 else (self._sync_send, self._sync_recv)
        B = env.num_envs // G
        if self._obs is None:
            self._obs = env.reset()
        obs = [{k: x[g * B:(g + 1) * B] for k, x in self._obs.items()} for g in range(G)]
        buf = [{"obs": [], "action": [], "log_prob": [], "value": [], "reward": [], "terminated": [],
                "truncated": [], "final_obs": [], "info": []} for _ in range(G)]
        # per-step keys as host arrays: indexing a device array costs a dispatch per step (~0.4 ms on CPU); each
        # is the data of an rbg key (two threefry keys' words, see __init__)
        keys = np.asarray(jax.random.key_data(jax.random.split(key, 2 * T * G))).reshape(T, G, 4)
        acted = [None] * G

        def act(g, t):
            action, log_prob, value = self._act(params, obs[g], keys[t, g])
            action = np.asarray(action)
            send(action, g)
            acted[g] = (action, log_prob, value)

        for g in range(G):
            act(g, 0)
        for t in range(T):
            for g in range(G):
                next_obs, reward, terminated, truncated, info = recv(g)
                done = np.logical_or(terminated, truncated)
                final = info.pop("final_obs")
                if done.any():
                    final_obs = jax.tree.map(
                        lambda f, n: np.where(done.reshape(done.shape + (1,) * (n.ndim - 1)), f, n), final, next_obs)
                else:  # nothing ended: the true next observation is next_obs (stacking below copies it)
                    final_obs = next_obs
                action, log_prob, value = acted[g]
                for k, v in (("obs", obs[g]), ("action", action), ("log_prob", log_prob), ("value", value),
                             ("reward", reward), ("terminated", terminated), ("truncated", truncated),
                             ("final_obs", final_obs),
                             ("info", {k: v for k, v in info.items() if k.startswith("episode_")})):
                    buf[g][k].append(v)
                obs[g] = next_obs
                if t + 1 < T:
                    act(g, t + 1)
        self._obs = obs[0] if G == 1 else {k: np.concatenate([o[k] for o in obs]) for k in obs[0]}
        # [T, B] per group -> [T, N]: groups side by side along the env axis
        stack = lambda xs: jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *xs)
        cat = lambda k: stack(buf[0][k]) if G == 1 else jax.tree.map(
            lambda *a: np.concatenate(a, axis=1), *[stack(b[k]) for b in buf])
        traj = Transition(cat("obs"), cat("action"), cat("log_prob"), cat("value"),
                          cat("reward").astype(np.float32), cat("terminated").astype(bool),
                          cat("truncated").astype(bool), cat("final_obs"), cat("info"))
        return traj, self._obs

    def _sync_send(self, actions, group):
        self._sent_actions = actions

    def _sync_recv(self, group):
        return self.env.step(self._sent_actions)

    def run(self, state: HostState, hp_or_updates=None, num_updates: Optional[int] = None):
        """``run(state, num_updates)``, or ``run(state, hp, num_updates)`` as the runner calls it."""
        if num_updates is None:
            num_updates = int(hp_or_updates)
        history = []
        t0 = time.perf_counter()
        for _ in range(num_updates):
            k_roll = jax.random.fold_in(state.key, 7)
            if self.overlap and self._pending is not None:
                traj, last_obs = self._pending
            else:
                traj, last_obs = self.collect(state.train_state.params, k_roll)
            self._pending = None
            host_metrics = {}
            if self.host_hook is not None:
                state, host_metrics = self.host_hook(state, traj)
            if self.overlap:
                box = {}
                th = threading.Thread(target=lambda: box.update(out=jax.block_until_ready(
                    self._learn(state, traj, last_obs))))
                th.start()
                self._pending = self.collect(state.train_state.params, jax.random.fold_in(k_roll, 1))
                th.join()
                state, metrics = box["out"]
            else:
                state, metrics = self._learn(state, traj, last_obs)
            metrics = jax.tree.map(np.asarray, metrics)
            metrics.update({k: np.float32(v) for k, v in host_metrics.items()})
            metrics["env_steps_per_s"] = np.float32(self.cfg.num_steps * self.env.num_envs /
                                                    max(time.perf_counter() - t0, 1e-9))
            t0 = time.perf_counter()
            history.append(metrics)
            step = int(state.update_step)
            if self.log_fn is not None and step % self.log_every == 0:
                self.log_fn(step, metrics)
        stacked = {k: np.stack([m[k] for m in history]) for k in history[0]} if history else {}
        return state, stacked


class JaxHostEnv:
    """A batched JAX env (``envs.make(name, num_envs=N)``) behind the host-env interface: numpy in, numpy out.

    For testing the host loop against the in-jit loop, and for running JAX envs next to host-only ones.
    """

    def __init__(self, name: str, num_envs: int, seed: int = 0, **kwargs):
        import envs
        self.env, self.params = envs.make(name, num_envs=num_envs, **kwargs)
        spec = envs.spec(self.env, self.params)
        if not spec.discrete:
            raise ValueError(f"JaxHostEnv: {name} has continuous actions; the host loop supports discrete ones")
        self.num_envs, self.num_actions, self._spec = num_envs, spec.num_actions, spec
        self._key = jax.random.PRNGKey(seed)
        self._step = jax.jit(self.env.step)
        self._reset = jax.jit(self.env.reset)  # compiled once: callers (SQIRL) reset every iteration
        self._state = None

    def observation_spec(self):
        return {"obs": (tuple(self._spec.obs_shape), np.float32)}

    def reset(self):
        self._key, k = jax.random.split(self._key)
        obs, self._state = self._reset(k, self.params)
        return {"obs": np.asarray(obs)}

    def step(self, actions):
        self._key, k = jax.random.split(self._key)
        obs, self._state, r, te, tr, info = self._step(k, self._state, jnp.asarray(actions), self.params)
        info = jax.tree.map(np.asarray, info)
        info["final_obs"] = {"obs": info["final_obs"]}
        return {"obs": np.asarray(obs)}, np.asarray(r), np.asarray(te), np.asarray(tr), info

    def close(self):
        pass
