"""PPO, pure-functional and jit-compiled end to end (Anakin), with pieces public for host-side loops (Sebulba).

Quick use::

    from agents import ppo
    cfg = ppo.Config(env_name="CartPole-v1", total_timesteps=500_000)
    out = jax.jit(ppo.make_train(cfg))(jax.random.PRNGKey(0))
    out.metrics["episode_return"]            # [num_updates]

    # several seeds x learning rates in one compiled call
    hp = ppo.hparams(cfg, learning_rate=jnp.array([1e-4, 3e-4, 1e-3]))
    jax.jit(jax.vmap(ppo.make_train(cfg)))(jax.random.split(key, 3), hp)

Pieces: :class:`PPO` (``init``/``act``/``value``/``targets``/``update``) learns from any batch of
:class:`~jaxrl_pref.rollout.Transition`; :func:`make_trainer` gives the chunked Anakin loop (``init`` and
``run(state, num_updates)``) that the experiment runner checkpoints between chunks; :func:`make_train` composes
them into one ``train(key, hp=None)``.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from flax import struct

import envs
from jaxrl_pref import distributed
from jaxrl_pref.config import ConfigError, in_range, positive, require
from jaxrl_pref.networks import ACTIVATIONS, ActorCritic, EncoderActorCritic, NetHackEncoder, distribution
from jaxrl_pref.losses import gae, ppo_loss
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rollout import Transition, collect, episode_metrics, next_values


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO configuration. Float hyperparameters can also be passed as (vmappable) arrays through :func:`hparams`."""
    env_name: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    learning_rate: float = 2.5e-4
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_eps: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    anneal_lr: bool = True
    clip_value: bool = True
    """Clip the value update to +-clip_eps around the old value (PPO2-style)."""
    normalize_advantages: bool = True
    bootstrap_truncated: bool = True
    """On time-limit truncation, bootstrap from V(final observation) (correct); False treats it as termination."""
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    normalize_obs: bool = False
    normalize_reward: bool = False
    num_devices: int = 1
    """Data-parallel devices: each runs num_envs/num_devices envs; gradients are averaged across devices."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        positive(self, "num_envs", "num_steps", "total_timesteps", "update_epochs", "num_minibatches",
                 "num_devices", "learning_rate", "clip_eps", "max_grad_norm")
        positive(self, "ent_coef", "vf_coef", strict=False)
        in_range(self, "gamma", 0.0, 1.0)
        in_range(self, "gae_lambda", 0.0, 1.0)
        require(self.activation in ACTIVATIONS, "activation", f"unknown activation {self.activation!r}",
                f"use one of {sorted(ACTIVATIONS)}")
        require(len(self.hidden) > 0 and all(h > 0 for h in self.hidden), "hidden",
                f"layer sizes must be positive, got {self.hidden}", "pass e.g. --hidden 64 64")
        require(self.num_envs % self.num_devices == 0, "num_envs",
                f"{self.num_envs} envs cannot be split evenly over {self.num_devices} devices",
                f"use a multiple of num_devices, e.g. --num-envs {self.num_devices * max(1, self.num_envs // self.num_devices)}")
        batch = self.num_steps * self.num_envs // self.num_devices
        require(batch % self.num_minibatches == 0, "num_minibatches",
                f"per-device batch num_steps*num_envs/num_devices = {batch} is not divisible into "
                f"{self.num_minibatches} minibatches",
                f"pick num_minibatches dividing {batch}, e.g. {_divisor_near(batch, self.num_minibatches)}")
        require(self.total_timesteps >= self.num_steps * self.num_envs, "total_timesteps",
                f"{self.total_timesteps} is less than one update's batch ({self.num_steps * self.num_envs} steps)",
                f"use at least {self.num_steps * self.num_envs}")
        if self.env_name not in envs.registered():
            try:
                envs.make(self.env_name)
            except ValueError as e:
                raise ConfigError("env_name", str(e).split(": ", 1)[-1].rstrip("."),
                                  "pick a registered env (python -c 'import envs; print(envs.registered())')") from None

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_steps * self.num_envs)

    @property
    def minibatch_size(self) -> int:
        return self.num_steps * self.num_envs // self.num_devices // self.num_minibatches


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


HPARAM_FIELDS = ("learning_rate", "gamma", "gae_lambda", "clip_eps", "ent_coef", "vf_coef", "max_grad_norm")


@struct.dataclass
class HParams:
    """Float hyperparameters as traced values, so they can be vmapped. Build with :func:`hparams`."""
    learning_rate: jax.Array
    gamma: jax.Array
    gae_lambda: jax.Array
    clip_eps: jax.Array
    ent_coef: jax.Array
    vf_coef: jax.Array
    max_grad_norm: jax.Array


def hparams(cfg: Config, **overrides) -> HParams:
    """HParams from ``cfg``; ``overrides`` may be arrays with a leading sweep axis. All leaves are broadcast to
    that common leading shape so ``jax.vmap(train)(keys, hp)`` maps over them together."""
    unknown = set(overrides) - set(HPARAM_FIELDS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "is not a vmappable hyperparameter", f"use one of {HPARAM_FIELDS}")
    vals = {k: jnp.asarray(overrides.get(k, getattr(cfg, k)), jnp.float32) for k in HPARAM_FIELDS}
    shape = jnp.broadcast_shapes(*(v.shape for v in vals.values()))
    return HParams(**{k: jnp.broadcast_to(v, shape) for k, v in vals.items()})


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any


@struct.dataclass
class RunnerState:
    """Everything the Anakin loop carries between updates; a checkpoint is exactly this pytree."""
    train_state: TrainState
    env_state: Any
    obs: Any
    reward_state: Any
    key: jax.Array
    update_step: jax.Array


@struct.dataclass
class TrainOutput:
    train_state: TrainState
    metrics: dict
    runner_state: RunnerState


class PPO:
    """PPO learner for one env interface. Usable from jitted (Anakin) and host-side (Sebulba) loops.

    All methods are pure; ``axis_name`` names the device axis to average gradients over (data-parallel).
    """

    def __init__(self, cfg: Config, spec: envs.EnvSpec, network=None):
        """``network`` maps a batch of observations to (policy parameters, value); default: an MLP
        :class:`ActorCritic` for array observations, a :class:`NetHackEncoder` one for dict observations."""
        self.cfg, self.spec = cfg, spec
        if network is None and isinstance(spec.obs_shape, dict):
            network = EncoderActorCritic(spec.num_actions, NetHackEncoder())
        if network is None:
            network = ActorCritic(spec.num_actions, spec.discrete, tuple(cfg.hidden), cfg.activation)
        self.network = network

    def optimizer(self, hp: HParams) -> optax.GradientTransformation:
        cfg = self.cfg
        if cfg.anneal_lr:
            steps_per_update = cfg.update_epochs * cfg.num_minibatches

            def lr(count):
                frac = 1.0 - (count // steps_per_update) / cfg.num_updates
                return hp.learning_rate * frac
        else:
            lr = hp.learning_rate
        return optax.chain(optax.clip_by_global_norm(hp.max_grad_norm), optax.adam(lr, eps=1e-5))

    def init(self, key, hp: HParams) -> TrainState:
        params = self.network.init(key, self.spec.dummy_obs())
        return TrainState(params, self.optimizer(hp).init(ravel_pytree(params)[0]))

    def act(self, params, obs, key):
        """Samples actions: returns (action, log_prob, value) for a batch of observations."""
        pi, value = self.network.apply(params, obs)
        dist = distribution(pi, self.spec.discrete)
        action, log_prob = dist.sample_and_log_prob(seed=key)
        return action, log_prob, value

    def value(self, params, obs):
        return self.network.apply(params, obs)[1]

    def targets(self, params, hp: HParams, traj: Transition, reward, last_obs):
        """(advantages, returns) for a time-major rollout, bootstrapping truncated steps from V(final_obs)."""
        last_value = self.value(params, last_obs)
        vf = partial(self.value, params) if self.cfg.bootstrap_truncated else None
        nxt = next_values(traj, last_value, vf)
        return gae(reward, traj.value, nxt, traj.terminated, traj.done, hp.gamma, hp.gae_lambda)

    def update(self, state: TrainState, hp: HParams, traj: Transition, advantages, returns, key,
               axis_name: Optional[str] = None):
        """``update_epochs`` passes of minibatch SGD over the batch. Returns (state, mean loss metrics)."""
        cfg = self.cfg
        tx = self.optimizer(hp)
        batch = (traj.obs, traj.action, traj.log_prob, traj.value, advantages, returns)
        batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
        n = jax.tree.leaves(batch)[0].shape[0]

        def loss_fn(params, mb):
            obs, action, old_log_prob, old_value, adv, ret = mb
            pi, value = self.network.apply(params, obs)
            dist = distribution(pi, self.spec.discrete)
            return ppo_loss(dist.log_prob(action), old_log_prob, adv, dist.entropy(), value, old_value, ret,
                            clip_eps=hp.clip_eps, vf_coef=hp.vf_coef, ent_coef=hp.ent_coef,
                            clip_value=cfg.clip_value, normalize_advantages=cfg.normalize_advantages)

        # The optimiser works on one flat parameter vector: a handful of fused elementwise ops per step instead
        # of a few per parameter leaf, which dominates small-network updates on CPU.
        flat0, unravel = ravel_pytree(state.params)

        def minibatch_step(carry, mb):
            flat, opt_state = carry
            (_, metrics), grads = jax.value_and_grad(lambda f: loss_fn(unravel(f), mb), has_aux=True)(flat)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            updates, opt_state = tx.update(grads, opt_state, flat)
            return (flat + updates, opt_state), metrics

        def epoch(carry, key):
            perm = shuffle_indices(key, n)
            mbs = jax.tree.map(lambda x: jnp.take(x, perm, axis=0).reshape(
                (cfg.num_minibatches, -1) + x.shape[1:]), batch)
            return jax.lax.scan(minibatch_step, carry, mbs)

        (flat, opt_state), metrics = jax.lax.scan(epoch, (flat0, state.opt_state),
                                                  jax.random.split(key, cfg.update_epochs))
        state = TrainState(unravel(flat), opt_state)
        metrics = jax.tree.map(jnp.mean, metrics)
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        return state, metrics


def shuffle_indices(key, n: int):
    """A uniformly random permutation of ``range(n)``.

    For n <= 2**16 it sorts one uint32 array holding random high bits and the index in the low bits (ties among
    the random parts, rare, keep index order): one single-operand sort, ~4x cheaper on CPU than
    ``jax.random.permutation``'s multi-round key/value sorts.
    """
    index_bits = max(1, (n - 1).bit_length())
    if index_bits > 16:
        return jax.random.permutation(key, n)
    mask = jnp.uint32((1 << index_bits) - 1)
    packed = (jax.random.bits(key, (n,), jnp.uint32) & ~mask) | jnp.arange(n, dtype=jnp.uint32)
    return (jnp.sort(packed) & mask).astype(jnp.int32)


def make_env(cfg: Config, num_envs: int | None = None):
    """The env stack for ``cfg``; ``num_envs`` defaults to the per-device share of ``cfg.num_envs``."""
    n = cfg.num_envs // cfg.num_devices if num_envs is None else num_envs
    return envs.make(cfg.env_name, num_envs=n, normalize_obs=cfg.normalize_obs,
                     normalize_reward=cfg.normalize_reward, gamma=cfg.gamma)


LogFn = Callable[[Any, dict], None]  # (update_step, metrics) -> None, called on the host


class Trainer:
    """The chunked Anakin loop: ``init(key, hp) -> RunnerState`` and ``run(state, hp, n) -> (state, metrics)``.

    Both are pure and jittable (``n`` static). With ``cfg.num_devices > 1`` they run under ``shard_map`` over a
    1-D device mesh: envs are split across devices, parameters are replicated, gradients averaged.

    Seeds and hyperparameters: ``jax.vmap`` over ``init``/``run`` (or ``make_train``) with ``num_devices == 1``.
    With ``num_devices > 1`` run seeds one after another: vmapping a shard_map'd trainer is rejected by jax 0.10's
    varying-axes checker, and vmapping inside the device map deadlocks XLA:CPU's in-process all-reduce on
    forced host devices (seen with 4 devices on 2 cores).
    """

    def __init__(self, cfg: Config, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1):
        self.cfg = cfg
        self.env, self.env_params = make_env(cfg)
        self.spec = envs.spec(self.env, self.env_params)
        self.agent = PPO(cfg, self.spec)
        self.reward = reward if reward is not None else IdentityReward()
        self.log_fn, self.log_every = log_fn, log_every
        self.mesh = distributed.data_mesh(cfg.num_devices) if cfg.num_devices > 1 else None
        self.axis = distributed.DATA_AXIS if self.mesh is not None else None

    # -- per-device bodies -------------------------------------------------------------------------------------
    def _init(self, key, hp):
        k_params, k_reward, k_env, k_run = jax.random.split(key, 4)
        if self.axis is not None:  # identical params everywhere, different envs per device
            k_env = jax.random.fold_in(k_env, jax.lax.axis_index(self.axis))
            k_run = jax.random.fold_in(k_run, jax.lax.axis_index(self.axis))
        train_state = self.agent.init(k_params, hp)
        obs, env_state = self.env.reset(k_env, self.env_params)
        return RunnerState(train_state, env_state, obs, self.reward.init(k_reward, self.spec), k_run,
                           jnp.int32(0))

    def _update(self, rs: RunnerState, hp: HParams):
        agent, cfg = self.agent, self.cfg
        key, k_roll, k_reward, k_upd = jax.random.split(rs.key, 4)
        policy = partial(agent.act, rs.train_state.params)
        env_state, obs, traj = collect(self.env, self.env_params, policy, rs.env_state, rs.obs, k_roll,
                                       cfg.num_steps)
        reward_state, r_metrics = self.reward.update(rs.reward_state, traj, k_reward, self.axis)
        reward, r2_metrics = self.reward(reward_state, traj)
        adv, ret = agent.targets(rs.train_state.params, hp, traj, reward, obs)
        train_state, l_metrics = agent.update(rs.train_state, hp, traj, adv, ret, k_upd, self.axis)
        metrics = {**episode_metrics(traj.info, self.axis), **l_metrics, **r_metrics, **r2_metrics}
        step = rs.update_step + 1
        if self.log_fn is not None:
            self._log(step, metrics)
        return RunnerState(train_state, env_state, obs, reward_state, key, step), metrics

    def _log(self, step, metrics):
        fn = self.log_fn
        if self.axis is not None:  # every device holds the same averaged metrics: log device 0's only
            first = jax.lax.axis_index(self.axis) == 0
            cb = lambda s, m, f: fn(s, m) if f else None
            do = lambda: jax.debug.callback(cb, step, metrics, first)
        else:
            do = lambda: jax.debug.callback(fn, step, metrics)
        jax.lax.cond(step % self.log_every == 0, do, lambda: None)

    def _run(self, rs, hp, num_updates: int):
        return jax.lax.scan(lambda c, _: self._update(c, hp), rs, None, length=num_updates)

    # -- public -----------------------------------------------------------------------------------------------
    def init(self, key, hp: Optional[HParams] = None) -> RunnerState:
        hp = hparams(self.cfg) if hp is None else hp
        if self.mesh is None:
            return self._init(key, hp)
        return distributed.shard(self._init, self.mesh, in_specs=(None, None), out_specs=self._rs_specs)(key, hp)

    def run(self, rs: RunnerState, hp: Optional[HParams] = None, num_updates: int = 1):
        hp = hparams(self.cfg) if hp is None else hp
        if self.mesh is None:
            return self._run(rs, hp, num_updates)
        body = partial(self._run, num_updates=num_updates)
        return distributed.shard(body, self.mesh, in_specs=(self._rs_specs, None),
                                 out_specs=(self._rs_specs, None))(rs, hp)

    @property
    def _rs_specs(self):
        # train state, reward state and step replicated; env state/obs split over envs; keys per device
        D, R = distributed.SPLIT, distributed.REPLICATED
        return RunnerState(R, D, D, R, D, R)


def make_trainer(cfg: Config, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1) -> Trainer:
    return Trainer(cfg, reward, log_fn, log_every)


def make_train(cfg: Config, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1):
    """Returns ``train(key, hp=None) -> TrainOutput`` running all ``cfg.num_updates`` updates in one scan.

    ``reward`` is a :class:`~jaxrl_pref.rewards.RewardTransform` (default: the env reward). ``log_fn(step,
    metrics)`` is called on the host every ``log_every`` updates through ``jax.debug.callback``.
    """
    trainer = Trainer(cfg, reward, log_fn, log_every)

    def train(key, hp: Optional[HParams] = None) -> TrainOutput:
        rs = trainer.init(key, hp)
        rs, metrics = trainer.run(rs, hp, cfg.num_updates)
        return TrainOutput(rs.train_state, metrics, rs)

    return train
