"""SQIRL (shallow Q-iteration via reinforcement learning; Laidlaw et al., "The Effective Horizon Explains Deep RL
Performance in Stochastic Environments"), pure-functional JAX; whole training in one ``jit`` for JAX envs.

Quick use::

    from agents import sqirl
    cfg = sqirl.Config(env_name="DeepSea-8", episodes_per_timestep=64, planning_depth=2)
    out = jax.jit(sqirl.make_train(cfg))(jax.random.PRNGKey(0))
    out.metrics["episode_success"]          # [horizon]: success of the greedy time-indexed policy after each t

    # seeds x planning depths in one compiled call (planning_depth is the static maximum k)
    hp = sqirl.hparams(cfg, planning_depth=jnp.array([1, 2]))
    jax.jit(jax.vmap(sqirl.make_train(cfg)))(jax.random.split(key, 2), hp)

The algorithm (variant implemented here). Training is indexed by the episode timestep ``t = 0 .. H-1``
(``H`` = ``horizon``, default the env's time limit); one iteration (one "update" for the runner) per ``t``:

1. **Collect** ``episodes_per_timestep`` fresh episodes of at most ``H`` steps. At step ``i < t`` they act greedily
   with the frozen policy ``pi_i``; from step ``t`` on uniformly at random. Only the first episode of each env
   counts (auto-reset continuations are masked out).
2. **Store** the transitions at steps ``i >= t`` (the random part) in a replay buffer with the Monte-Carlo return
   of their random continuation (``jaxrl_pref.losses.discounted_returns``). The buffer is a ring of the last
   ``buffer_timesteps`` iterations (default all ``H``), each slot ``[H, episodes]``; a slot stored at iteration
   ``s`` is sampled with weight ``replay_priority_factor ** (t - s)`` (the reference multiplies all priorities by the
   factor after each timestep: the same weights).
3. **Fit** one Q-network with ``k = planning_depth`` heads on minibatches drawn by those weights
   (``ceil(n_epochs * episodes * H / batch_size)`` Adam steps, gradient-norm clipping): head 1 regresses the
   Monte-Carlo returns (Q of the random policy); head ``j > 1`` regresses ``r + gamma * max_a head_{j-1}(s')`` with
   zero past the episode's end (``jaxrl_pref.losses.fitted_q_targets``): ``k - 1`` steps of fitted-Q iteration.
   Squared error or Huber. The network and optimiser state carry over from one timestep to the next.
4. **Freeze** a copy of the parameters as ``pi_t`` (greedy on head ``k``), stored at index ``t`` of a stacked
   parameter pytree ``[H, ...]``; ``t += 1``.
5. **Evaluate** (logged as ``episode_return``/``episode_success``/``episode_length``): ``eval_episodes`` episodes of
   the greedy time-indexed policy, ``pi_i`` at step ``i <= t`` and the newest network beyond (the reference's
   deterministic ``predict``). Exploration episodes are logged under ``explore/``.

Differences from the paper / reference (``effective_horizon/sb3/algorithms/sqirl.py``):

* Fixed shapes for ``jit``: every iteration runs exactly ``episodes_per_timestep`` episodes of ``H`` env steps
  (steps after an episode ended are computed and masked); the reference collects variable-length episodes.
  ``experience_steps`` counts only the steps of those first episodes, as the reference does.
* A finite horizon ``H``: the last step inside ``H`` is treated as terminal for returns and backups (as in the
  paper's finite-horizon setting); with ``H`` equal to the env's time limit this is the reference's behaviour (it
  treats time-limit truncation as ``done``, i.e. no bootstrapping).
* The k heads are trained with the *sum* of per-head mean losses (the reference averages over heads; Adam makes the
  difference a constant rescaling). Heads beyond a traced ``hp.planning_depth`` are masked out of the loss, which
  lets one compiled program be ``vmap``\\ped over k (``planning_depth`` in :class:`Config` is then the maximum).
  Each head's initial parameters come from ``fold_in(key, head)``, so a run with k heads starts (and, since heads
  do not feed each other's gradients except through targets, trains) exactly like the first k heads of a run with
  more heads -- with ``separate_networks`` (default, as the paper's experiments) and also with a shared torso,
  whose gradients come only from the unmasked heads.
* ``episodes_per_timestep`` can be ``vmap``\\ped too (``hp.episodes_per_timestep`` <= the static config value):
  envs beyond it are stepped but masked; the gradient-step count stays that of the static value.
* Not implemented: distributional heads, dueling heads, EMA of parameters, intra-step LR decay, loss scaling,
  the "purely exploring" warm-up fraction (all off by default in the reference). Random actions are uniform over a
  discrete action space (SQIRL needs discrete actions).
* Defaults for small CPU budgets: learning rate 1e-3 (reference 1e-4) and ``n_epochs`` 16 (reference 1): with
  tens of episodes per timestep, one pass gives only a handful of Adam steps per timestep.

Host envs (NetHack/MiniHack pool, or :class:`envs.host.JaxHostEnv`): :class:`HostTrainer` collects the
same episodes with the same jitted time-indexed ``act`` on the host and calls the same jitted ``learn`` step
(steps 2-4) as the in-jit trainer.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import envs
from envs.host import host_spec
from jaxrl_pref import prng
from jaxrl_pref.config import (ConfigError, build_hparams, hparams_class, in_range, positive, require, vmappable,
                               vmappable_fields)
from jaxrl_pref.loop import HostLoop, LogFn, ScanLoop, host_rollout
from jaxrl_pref.losses import discounted_returns, fitted_q_targets, huber
from jaxrl_pref.networks import ACTIVATIONS, MLP, NetHackEncoder, orthogonal
from jaxrl_pref.rollout import episode_metrics


@dataclasses.dataclass(frozen=True)
class Config:
    """SQIRL configuration (see the module docstring for the algorithm and its differences from the paper)."""
    env_name: str = "DeepSea-8"
    horizon: Optional[int] = None
    """Timesteps H: policies learned (one training iteration each) and max steps per episode. None: the env's
    time limit (max_steps_in_episode)."""
    total_timesteps: Optional[int] = None
    """Env-step budget. SQIRL always trains all H timesteps (its greedy policy is complete only then), each on
    episodes_per_timestep episodes of H steps, so a budget sets episodes_per_timestep = total_timesteps // H**2
    (at least 1; it overrides --episodes-per-timestep). None: use --episodes-per-timestep."""
    episodes_per_timestep: int = vmappable(64)
    """Episodes collected per timestep (run as a batch of this many envs)."""
    planning_depth: int = vmappable(1)
    """k: Q-heads; head 1 fits Monte-Carlo returns of the random policy, heads 2..k do k-1 fitted-Q backups."""
    gamma: float = vmappable(0.99)
    learning_rate: float = vmappable(1e-3)
    batch_size: int = 256
    n_epochs: int = 16
    """Adam steps per timestep = ceil(n_epochs * episodes_per_timestep * H / batch_size)."""
    max_grad_norm: float = 10.0
    huber_loss: bool = False
    replay_priority_factor: float = vmappable(1.0)
    """Sampling weight of replay data stored s timesteps ago is this factor ** s (1: all data equal)."""
    buffer_timesteps: Optional[int] = None
    """Replay buffer size in timesteps (ring); None: H (keep everything)."""
    separate_networks: bool = True
    """One MLP per head (True) or one shared torso with k linear heads (False)."""
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    eval_episodes: int = 16
    """Episodes of the greedy time-indexed policy evaluated after each timestep."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        envs.check_name(self.env_name)  # a registry lookup: builds no env
        positive(self, "episodes_per_timestep", "planning_depth", "batch_size", "n_epochs", "learning_rate",
                 "max_grad_norm", "eval_episodes")
        in_range(self, "gamma", 0.0, 1.0)
        in_range(self, "replay_priority_factor", 0.0, 1.0)
        for name in ("horizon", "buffer_timesteps"):
            v = getattr(self, name)
            require(v is None or v >= 1, name, f"must be >= 1 (or unset), got {v}",
                    f"pass a positive number of timesteps, e.g. --{name.replace('_', '-')} 10, or leave it unset")
        require(self.activation in ACTIVATIONS, "activation", f"unknown activation {self.activation!r}",
                f"use one of {sorted(ACTIVATIONS)}")
        require(all(h > 0 for h in self.hidden), "hidden", f"layer sizes must be positive, got {self.hidden}",
                "pass e.g. --hidden 64 64")
        require(self.total_timesteps is None or self.total_timesteps >= 1, "total_timesteps",
                f"must be positive (or unset), got {self.total_timesteps}", "pass e.g. --total-timesteps 100000")
        require(not envs.entry(self.env_name).host or self.horizon is not None, "horizon",
                f"{self.env_name} is a host env with no time limit to read", "pass --horizon H (e.g. 50)")

    def check_env(self) -> None:
        """Checks the env (known, discrete actions, a horizon to use); raises ConfigError naming the field. Called
        when a trainer is built (constructing a Config builds no env)."""
        if envs.entry(self.env_name).host:  # NetHack/MiniHack pool: checked when the pool starts
            return
        discrete, limit = _env_facts(self.env_name)
        require(discrete, "env_name", f"{self.env_name} has continuous actions; SQIRL acts uniformly at random "
                "over a discrete action set", "pick a discrete-action task, e.g. DeepSea-8, KeyDoor-5, "
                "SparseMountainCar-v0, SparseCartPole-v1")
        require(self.horizon is not None or limit is not None, "horizon",
                f"{self.env_name} has no max_steps_in_episode to take the horizon from", "pass --horizon H")

    def resolved_horizon(self) -> int:
        if self.horizon is not None or envs.entry(self.env_name).host:
            return int(self.horizon)
        return int(_env_facts(self.env_name)[1])

    def with_budget(self) -> "Config":
        """This config with ``total_timesteps`` turned into ``episodes_per_timestep`` (see that field)."""
        if self.total_timesteps is None:
            return self
        return dataclasses.replace(self, episodes_per_timestep=max(1, self.total_timesteps // self.resolved_horizon() ** 2))

    @property
    def num_updates(self) -> int:
        """Training iterations: one per timestep."""
        return self.resolved_horizon()

    @property
    def steps_per_update(self) -> int:
        """Env steps computed per iteration (an upper bound on the experience used: episodes can end early)."""
        return self.episodes_per_timestep * self.resolved_horizon()

    @property
    def grad_steps(self) -> int:
        return math.ceil(self.n_epochs * self.episodes_per_timestep * self.resolved_horizon() / self.batch_size)


@functools.lru_cache(maxsize=None)
def _env_facts(env_name: str) -> tuple[bool, Optional[int]]:
    """(discrete actions, max_steps_in_episode or None) of a JAX env, built once per name."""
    env, params = envs.make(env_name)
    return envs.spec(env, params).discrete, getattr(params, "max_steps_in_episode", None)


HPARAM_FIELDS = vmappable_fields(Config)
HParams = hparams_class(Config)
HParams.__doc__ = """Traced (vmappable) hyperparameters. ``planning_depth`` / ``episodes_per_timestep`` must not exceed
the config's values, which fix the number of heads and of envs."""


def hparams(cfg: Config, **overrides) -> HParams:
    """HParams from ``cfg``; overrides may carry a leading sweep axis (all leaves are broadcast to it)."""
    unknown = set(overrides) - set(HPARAM_FIELDS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "is not a vmappable SQIRL hyperparameter", f"use one of {HPARAM_FIELDS}")
    for name in ("planning_depth", "episodes_per_timestep"):
        if name in overrides:
            v = np.asarray(overrides[name])
            require(bool(((v >= 1) & (v <= getattr(cfg, name))).all()), name,
                    f"swept values {v.tolist()} must lie in [1, {getattr(cfg, name)}] (the config's value is the "
                    "static maximum)", f"raise Config.{name} to at least {int(v.max())}")
    return build_hparams(HParams, cfg, overrides, {"planning_depth": jnp.int32, "episodes_per_timestep": jnp.int32})


# -- Q-network ----------------------------------------------------------------------------------------------------

class _Torso(nn.Module):
    """MLP on array observations (or on ``obs["obs"]``); :class:`NetHackEncoder` on NetHack dict observations."""
    hidden: tuple = (64, 64)
    activation: str = "relu"
    nethack: bool = False

    @nn.compact
    def __call__(self, obs):
        if self.nethack:
            return NetHackEncoder()(obs)
        if isinstance(obs, dict):
            obs = obs["obs"]
        return MLP(self.hidden, self.activation)(obs.astype(jnp.float32))


class _Linear(nn.Module):
    num_actions: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.num_actions, kernel_init=orthogonal(1.0), bias_init=nn.initializers.zeros)(h)


class _Head(nn.Module):
    torso: nn.Module
    num_actions: int

    @nn.compact
    def __call__(self, obs):
        return _Linear(self.num_actions)(self.torso(obs))


class QNetwork:
    """``k`` Q-heads over one observation batch: ``apply(params, obs) -> [k, B, num_actions]``.

    Head ``j`` is initialised from ``fold_in(key, j)`` (independent of ``k``). ``separate=True``: ``k`` full
    networks (parameters stacked on a leading head axis, evaluated with ``vmap``); ``False``: one shared torso and
    ``k`` stacked linear output layers.
    """

    def __init__(self, spec: envs.EnvSpec, num_heads: int, hidden=(64, 64), activation="relu", separate=True):
        nethack = isinstance(spec.obs_shape, dict) and set(spec.obs_shape) != {"obs"}
        self.spec, self.num_heads, self.separate = spec, num_heads, separate
        self.torso = _Torso(tuple(hidden), activation, nethack)
        self.head = _Head(self.torso, spec.num_actions)
        self.linear = _Linear(spec.num_actions)

    def _head_keys(self, key):
        return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(self.num_heads))

    def init(self, key, obs=None):
        obs = self.spec.dummy_obs() if obs is None else obs
        if isinstance(self.spec.obs_shape, dict) and set(self.spec.obs_shape) == {"obs"} and not isinstance(obs, dict):
            obs = {"obs": obs}
        keys = self._head_keys(key)
        if self.separate:
            return {"heads": jax.vmap(self.head.init, in_axes=(0, None))(keys, obs)}
        torso = self.torso.init(jax.random.fold_in(key, 1 << 20), obs)
        h = self.torso.apply(torso, obs)
        return {"torso": torso, "heads": jax.vmap(self.linear.init, in_axes=(0, None))(keys, h)}

    def apply(self, params, obs):
        if self.separate:
            return jax.vmap(self.head.apply, in_axes=(0, None))(params["heads"], obs)
        h = self.torso.apply(params["torso"], obs)
        return jax.vmap(self.linear.apply, in_axes=(0, None))(params["heads"], h)


# -- state --------------------------------------------------------------------------------------------------------

@struct.dataclass
class Rollout:
    """Time-major ``[H, N]`` episodes as collected (in jit or on the host)."""
    obs: Any
    action: jax.Array
    reward: jax.Array
    done: jax.Array        # the episode ended at this step (terminated or truncated)
    next_obs: Any          # the true next observation (final observation where the episode ended)
    alive: jax.Array       # the step belongs to the env's first episode of this rollout
    info: dict             # episode_* statistics from the env


@struct.dataclass
class Buffer:
    """Replay ring of ``[S, H, N]`` slots (one slot per timestep iteration)."""
    obs: Any
    next_obs: Any
    action: jax.Array
    reward: jax.Array
    terminal: jax.Array
    mc_return: jax.Array
    valid: jax.Array
    stamp: jax.Array       # [S] iteration that wrote the slot, -1 when empty


@struct.dataclass
class SQIRLState:
    params: Any
    opt_state: Any
    policies: Any          # params stacked [H, ...]: policies[t] is the frozen policy for timestep t
    buffer: Buffer
    t: jax.Array           # timesteps learned so far (= index of the next policy to learn)
    key: jax.Array
    env_steps: jax.Array


@struct.dataclass
class TrainOutput:
    state: SQIRLState
    metrics: dict


# -- the learner (shared by the in-jit and the host loops) ---------------------------------------------------------

class SQIRL:
    """Pure pieces: ``init``, ``act`` (time-indexed greedy / random), ``learn`` (store, fit, freeze)."""

    def __init__(self, cfg: Config, spec: envs.EnvSpec, horizon: int, network: Optional[QNetwork] = None):
        self.cfg, self.spec, self.horizon = cfg, spec, horizon
        self.num_envs = cfg.episodes_per_timestep
        self.slots = min(cfg.buffer_timesteps or horizon, horizon)
        self.grad_steps = math.ceil(cfg.n_epochs * cfg.episodes_per_timestep * horizon / cfg.batch_size)
        self.net = network or QNetwork(spec, cfg.planning_depth, cfg.hidden, cfg.activation, cfg.separate_networks)

    def optimizer(self, hp: HParams):
        return optax.chain(optax.clip_by_global_norm(self.cfg.max_grad_norm), optax.adam(hp.learning_rate))

    def init(self, key, hp: HParams) -> SQIRLState:
        k_net, k_run = jax.random.split(key)
        obs = self.spec.dummy_obs()
        params = self.net.init(k_net, obs)
        policies = jax.tree.map(lambda p: jnp.zeros((self.horizon,) + p.shape, p.dtype), params)
        S, H, N = self.slots, self.horizon, self.num_envs
        zeros_obs = jax.tree.map(lambda o: jnp.zeros((S, H, N) + o.shape[1:], o.dtype), obs)
        f32 = jnp.zeros((S, H, N), jnp.float32)
        buf = Buffer(zeros_obs, zeros_obs, jnp.zeros((S, H, N), jnp.int32), f32, f32.astype(bool), f32,
                     f32.astype(bool), jnp.full((S,), -1, jnp.int32))
        return SQIRLState(params, self.optimizer(hp).init(params), policies, buf, jnp.int32(0), k_run,
                          jnp.float32(0.0))

    def q_values(self, params, obs):
        return self.net.apply(params, obs)

    def greedy(self, params, obs, depth):
        q = self.q_values(params, obs)  # [k, B, A]
        return jnp.argmax(jnp.take(q, depth - 1, axis=0), axis=-1).astype(jnp.int32)

    def act(self, policies, step, greedy_until, last_policy, obs, key, depth):
        """Actions at episode step ``step``: greedy on ``policies[min(step, last_policy)]`` while
        ``step < greedy_until``, uniformly random after. Exploration at timestep t: ``greedy_until = t``;
        evaluation after learning t: ``greedy_until = H``, ``last_policy = t``."""
        idx = jnp.clip(jnp.minimum(step, last_policy), 0, self.horizon - 1)
        params = jax.tree.map(lambda P: P[idx], policies)
        n = jax.tree.leaves(obs)[0].shape[0]
        rand = jax.random.randint(key, (n,), 0, self.spec.num_actions)
        return jnp.where(step < greedy_until, self.greedy(params, obs, depth), rand)

    def _loss(self, params, batch, hp: HParams):
        obs, next_obs, action, reward, terminal, mc = batch
        next_q = self.q_values(params, next_obs)
        targets = fitted_q_targets(mc, reward, terminal, next_q, hp.gamma)       # [k, B]
        q = self.q_values(params, obs)                                           # [k, B, A]
        pred = jnp.take_along_axis(q, action[None, :, None], axis=-1)[..., 0]   # [k, B]
        err = pred - targets
        per = (huber(err) if self.cfg.huber_loss else jnp.square(err)).mean(axis=1)  # [k]
        mask = (jnp.arange(self.net.num_heads) < hp.planning_depth).astype(jnp.float32)
        return (per * mask).sum(), (per, pred.mean(axis=1))

    def regress(self, params, opt_state, hp: HParams, data, weights, key, num_steps: int):
        """``num_steps`` Adam steps on minibatches drawn from flat ``data`` = (obs, next_obs, action, reward,
        terminal, mc_return) with probability proportional to ``weights`` (inverse-CDF sampling).
        Returns (params, opt_state, {"loss/q": mean total, "loss/q_head{j}": ..., "q/head{j}": mean prediction})."""
        tx = self.optimizer(hp)
        cdf = jnp.cumsum(weights)
        total = cdf[-1]
        n = weights.shape[0]

        def step(carry, k):
            params, opt_state = carry
            u = jax.random.uniform(k, (self.cfg.batch_size,)) * total
            idx = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, n - 1)
            batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
            (loss, (per, qmean)), grads = jax.value_and_grad(self._loss, has_aux=True)(params, batch, hp)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, per, qmean)

        (params, opt_state), (loss, per, qmean) = jax.lax.scan(step, (params, opt_state),
                                                               jax.random.split(key, num_steps))
        metrics = {"loss/q": loss.mean()}
        for j in range(self.net.num_heads):
            metrics[f"loss/q_head{j + 1}"] = per[:, j].mean()
            metrics[f"q/head{j + 1}"] = qmean[:, j].mean()
        return params, opt_state, metrics

    def learn(self, state: SQIRLState, hp: HParams, ro: Rollout):
        """Steps 2-4 of the algorithm for the rollout collected at timestep ``state.t``."""
        H, N, t = self.horizon, self.num_envs, state.t
        key, k_fit = jax.random.split(state.key)
        step_idx = jnp.arange(H)[:, None]
        active = (jnp.arange(N) < hp.episodes_per_timestep)[None, :]
        alive = ro.alive & active
        terminal = ro.done | (step_idx == H - 1)
        mc = discounted_returns(ro.reward, terminal, hp.gamma)
        valid = alive & (step_idx >= t)
        slot = t % self.slots
        b = state.buffer
        put = lambda B, x: B.at[slot].set(x)  # noqa: E731
        buf = Buffer(jax.tree.map(put, b.obs, ro.obs), jax.tree.map(put, b.next_obs, ro.next_obs),
                     put(b.action, ro.action.astype(jnp.int32)), put(b.reward, ro.reward.astype(jnp.float32)),
                     put(b.terminal, terminal), put(b.mc_return, mc), put(b.valid, valid), b.stamp.at[slot].set(t))
        age = (t - buf.stamp).astype(jnp.float32)
        slot_w = jnp.where(buf.stamp >= 0, hp.replay_priority_factor ** age, 0.0)
        weights = (buf.valid * slot_w[:, None, None]).reshape(-1)
        flat = lambda x: x.reshape((-1,) + x.shape[3:])  # noqa: E731
        data = (jax.tree.map(flat, buf.obs), jax.tree.map(flat, buf.next_obs), flat(buf.action), flat(buf.reward),
                flat(buf.terminal), flat(buf.mc_return))
        params, opt_state, metrics = self.regress(state.params, state.opt_state, hp, data, weights, k_fit,
                                                  self.grad_steps)
        policies = jax.tree.map(lambda P, p: P.at[jnp.minimum(t, H - 1)].set(p), state.policies, params)
        steps = state.env_steps + alive.sum().astype(jnp.float32)
        explore = episode_metrics({**ro.info, "episode_done": ro.info["episode_done"] & alive})
        metrics.update({f"explore/{k}": v for k, v in explore.items()})
        metrics.update({"experience_steps": steps, "timestep": (t + 1).astype(jnp.float32),
                        "replay/valid_transitions": (weights > 0).sum().astype(jnp.float32)})
        return SQIRLState(params, opt_state, policies, buf, t + 1, key, steps), metrics


def eval_metrics(ro: Rollout) -> dict:
    """Statistics of each env's first episode cut at the horizon H (SQIRL's finite-horizon MDP): ``episode_return``
    = the rewards within H, ``episode_length`` = its steps within H, ``episode_success`` = it ended successfully
    within H; ``episodes_finished`` = the fraction that ended on their own within H (on host envs whose episodes
    outlast H, e.g. MiniHack, the rest are cut). Other ``episode_*`` statistics: over the finished episodes."""
    finished = ro.info["episode_done"] & ro.alive  # [H, N]: the step where the first episode ended
    out = episode_metrics({**ro.info, "episode_done": finished})
    alive = ro.alive.astype(jnp.float32)
    out["episode_return"] = (ro.reward * alive).sum(0).mean()
    out["episode_length"] = alive.sum(0).mean()
    if "episode_success" in ro.info:
        out["episode_success"] = (ro.info["episode_success"] * finished).sum(0).mean()
    out["episodes_finished"] = finished.any(0).astype(jnp.float32).mean()
    return out


# -- trainers: the learner in the scanned loop and in the host loop (jaxrl_pref.loop) ----------------------------

class Trainer(ScanLoop):
    """``init(key, hp) -> SQIRLState`` and ``run(state, hp, n) -> (state, metrics)``: a
    :class:`~jaxrl_pref.loop.ScanLoop` over :meth:`step` (one update = one timestep); pure, jittable, vmappable
    over seeds and hyperparameters."""

    def __init__(self, cfg: Config, log_fn: Optional[LogFn] = None, log_every: int = 1):
        self.cfg = cfg
        self.env, self.env_params = envs.make(cfg.env_name, num_envs=cfg.episodes_per_timestep)
        self.eval_env, _ = envs.make(cfg.env_name, num_envs=cfg.eval_episodes)
        self.spec = envs.spec(self.env, self.env_params)
        self.horizon = cfg.resolved_horizon()
        self.agent = SQIRL(cfg, self.spec, self.horizon)
        super().__init__(lambda key, hp, axis_name: self.agent.init(key, hp), self.step,
                         functools.partial(hparams, cfg), lambda state: state.t, log_fn=log_fn, log_every=log_every)

    def rollout(self, env, policies, greedy_until, last_policy, depth, key) -> Rollout:
        k_reset, k_steps = jax.random.split(key)
        obs, env_state = env.reset(k_reset, self.env_params)
        n = jax.tree.leaves(obs)[0].shape[0]

        def step(carry, x):
            env_state, obs, alive = carry
            i, k = x
            k_act, k_env = jax.random.split(k)
            a = self.agent.act(policies, i, greedy_until, last_policy, obs, k_act, depth)
            nobs, env_state, r, term, trunc, info = env.step(k_env, env_state, a, self.env_params)
            done = term | trunc
            final = info.pop("final_obs")
            info = {k: v for k, v in info.items() if k.startswith("episode_")}
            rec = Rollout(obs, a, r, done, final, alive, info)
            return (env_state, nobs, alive & ~done), rec

        xs = (jnp.arange(self.horizon), jax.random.split(k_steps, self.horizon))
        _, ro = jax.lax.scan(step, (env_state, obs, jnp.ones((n,), bool)), xs)
        return ro

    def step(self, state: SQIRLState, hp: HParams, axis_name: Optional[str] = None):
        """One timestep: explore, learn (:meth:`SQIRL.learn`), evaluate the greedy time-indexed policy."""
        key, k_col, k_eval = jax.random.split(state.key, 3)
        state = state.replace(key=key)
        # the rollouts' keys hash unrolled (same bits, faster per step on CPU: jaxrl_pref.prng)
        k_col, k_eval = prng.unrolled(k_col), prng.unrolled(k_eval)
        ro = self.rollout(self.env, state.policies, state.t, state.t - 1, hp.planning_depth, k_col)
        t = state.t
        state, metrics = self.agent.learn(state, hp, ro)
        ev = self.rollout(self.eval_env, state.policies, self.horizon, t, hp.planning_depth, k_eval)
        return state, {**eval_metrics(ev), **metrics}


class HostTrainer(HostLoop):
    """SQIRL on a host env (the interface in :mod:`envs.host`): a :class:`~jaxrl_pref.loop.HostLoop` whose
    iteration collects the timestep's episodes with the same jitted time-indexed ``act`` on the host
    (:func:`~jaxrl_pref.loop.host_rollout`, stopping once every first episode has ended), calls the same jitted
    :meth:`SQIRL.learn` as the in-jit trainer and evaluates; one timestep per update.

    The env must hold ``cfg.episodes_per_timestep`` envs (exploration) and is also used for evaluation
    (``eval_episodes`` is then its ``num_envs``). ``horizon`` defaults to ``cfg.horizon`` (required: host envs have
    no params to read the time limit from). ``run(state, hp, num_updates)`` ignores ``hp`` (from ``cfg``)."""

    def __init__(self, cfg: Config, env, log_fn: Optional[LogFn] = None, log_every: int = 1,
                 horizon: Optional[int] = None, network: Optional[QNetwork] = None):
        if env.num_envs != cfg.episodes_per_timestep:
            raise ConfigError("episodes_per_timestep", f"{cfg.episodes_per_timestep} does not match the host env's "
                              f"num_envs={env.num_envs}", f"pass --episodes-per-timestep {env.num_envs}")
        self.horizon = int(horizon or cfg.horizon or 0)
        if self.horizon < 1:
            raise ConfigError("horizon", "a host env needs an explicit horizon", "pass --horizon H")
        self.cfg, self.env = cfg, env
        self.spec = host_spec(env)
        self.agent = SQIRL(cfg, self.spec, self.horizon, network)
        self.hp = hparams(cfg)
        self._act = jax.jit(self.agent.act)
        # the state (replay buffer, stacked policies) is donated: learn writes its slot in place, not into a copy
        # (init gives every leaf its own buffer: XLA refuses to donate one buffer twice)
        self._learn = jax.jit(self.agent.learn, donate_argnums=0)
        self._eval = jax.jit(eval_metrics)
        super().__init__(self._collect, self._learn_and_evaluate, lambda state: int(state.t),
                         lambda seconds: {"time/iteration_s": np.float32(seconds)}, log_fn=log_fn,
                         log_every=log_every)

    def init(self, key, hp: Optional[HParams] = None) -> SQIRLState:
        # a copy per leaf: the agent's init may share one zeros buffer between leaves, which donation cannot take
        return jax.tree.map(jnp.copy, self.agent.init(key, self.hp if hp is None else hp))

    def rollout(self, state: SQIRLState, greedy_until: int, last_policy: int, key) -> Rollout:
        """Each env's first episode from a reset, ``[H, N]``; steps after all of them ended are not taken but
        padded (masked: ``alive`` False, zero reward)."""
        H = self.horizon
        keys = np.asarray(jax.random.split(key, H))  # host array: no device dispatch per step
        policy = lambda obs, i, g: (self._act(state.policies, jnp.int32(i), jnp.int32(greedy_until),  # noqa: E731
                                              jnp.int32(last_policy), obs, keys[i], self.hp.planning_depth),)
        s, _ = host_rollout(self.env, policy, self.env.reset(), H, until_first_episodes_end=True)
        done = np.logical_or(s.terminated, s.truncated)
        pad = H - done.shape[0]
        last = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x  # noqa: E731
        zeros = lambda x: np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x  # noqa: E731
        done = last(done)
        alive = np.concatenate([np.ones_like(done[:1]), np.logical_and.accumulate(~done[:-1], axis=0)])
        return Rollout(jax.tree.map(last, s.obs), last(s.action).astype(np.int32),
                       zeros(s.reward.astype(np.float32)), done, jax.tree.map(last, s.final_obs), alive,
                       jax.tree.map(zeros, s.info))

    def _collect(self, state: SQIRLState, ahead: bool = False):
        t = int(state.t)
        k_col, k_eval = jax.random.split(jax.random.fold_in(state.key, 17))
        return self.rollout(state, t, t - 1, k_col), t, k_eval

    def _learn_and_evaluate(self, state: SQIRLState, batch):
        ro, t, k_eval = batch
        state, metrics = self._learn(state, self.hp, ro)
        ev = self.rollout(state, self.horizon, t, k_eval)
        return state, {**self._eval(ev), **metrics}


def make_trainer(cfg: Config, log_fn: Optional[LogFn] = None, log_every: int = 1, *, env=None,
                 horizon: Optional[int] = None):
    """SQIRL's trainer for :func:`jaxrl_pref.runner.run_experiment`: with ``env=None`` the in-jit loop on
    ``cfg.env_name`` (:class:`Trainer`); with a host env (``NLEPool``, ``JaxHostEnv``) the host loop
    (:class:`HostTrainer`, ``horizon`` defaulting to ``cfg.horizon``)."""
    if env is None:
        return Trainer(cfg, log_fn, log_every)
    return HostTrainer(cfg, env, log_fn, log_every, horizon=horizon)


def make_train(cfg: Config, log_fn: Optional[LogFn] = None, log_every: int = 1):
    """``train(key, hp=None) -> TrainOutput`` running all ``horizon`` timesteps in one scan."""
    trainer = Trainer(cfg, log_fn, log_every)

    def train(key, hp: Optional[HParams] = None) -> TrainOutput:
        state = trainer.init(key, hp)
        state, metrics = trainer.run(state, hp, trainer.horizon)
        return TrainOutput(state, metrics)

    return train


def host_env(cfg: Config, seed: int) -> Any:
    """The env :class:`HostTrainer` steps for ``cfg``: a NetHack/MiniHack pool of ``episodes_per_timestep`` envs, or
    the JAX env behind the host-env interface (:class:`envs.host.JaxHostEnv`)."""
    if envs.entry(cfg.env_name).host:
        return envs.make(cfg.env_name, num_envs=cfg.episodes_per_timestep, seed=seed)[0]
    from envs.host import JaxHostEnv
    return JaxHostEnv(cfg.env_name, cfg.episodes_per_timestep, seed=seed)
