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
from jaxrl_pref import distributed, prng
from jaxrl_pref.config import build_hparams, hparams_class, in_range, positive, require, vmappable, vmappable_fields
from jaxrl_pref.networks import (ACTIVATIONS, ActorCritic, EncoderActorCritic, NetHackEncoder, RecurrentActorCritic,
                                 distribution)
from jaxrl_pref.recurrent import RecurrentState
from jaxrl_pref import language as _language
from jaxrl_pref.language import LANGUAGES
from jaxrl_pref.loop import LogFn, ScanLoop
from jaxrl_pref.losses import gae, ppo_loss
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rewards.transform import SINGLE, Stream, reward_streams, update_and_reward
from jaxrl_pref.rollout import Transition, collect, episode_metrics, next_values


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO: the env batch, the update and the policy network (feed-forward MLP, or a GRU/LSTM core).

    The fields declared ``vmappable`` can also be passed as (vmappable) arrays through :func:`hparams`.
    Constructing a Config checks its values only; the env is checked when a trainer is built."""
    env_name: str = "CartPole-v1"
    num_envs: int = 4
    num_steps: int = 128
    total_timesteps: int = 500_000
    learning_rate: float = vmappable(2.5e-4)
    update_epochs: int = 4
    num_minibatches: int = 4
    gamma: float = vmappable(0.99)
    gae_lambda: float = vmappable(0.95)
    clip_eps: float = vmappable(0.2)
    ent_coef: float = vmappable(0.01)
    vf_coef: float = vmappable(0.5)
    max_grad_norm: float = vmappable(0.5)
    anneal_lr: bool = True
    clip_value: bool = True
    """Clip the value update to +-clip_eps around the old value (PPO2-style)."""
    normalize_advantages: bool = True
    bootstrap_truncated: bool = True
    """On time-limit truncation, bootstrap from V(final observation) (correct); False treats it as termination."""
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    network: str = "mlp"
    """Policy network: mlp (feed-forward), gru or lstm: torso MLP(hidden) (or the NetHack encoder) -> recurrent core
    of rnn_hidden -> actor and critic heads; the carry resets at episode starts and the update re-runs the core
    over whole env sequences (docs/library.md, Recurrent policies)."""
    rnn_hidden: int = 128
    """Width of the GRU/LSTM core."""
    critic: str = "auto"
    """Recurrent networks: what the critic reads. detached: the core's output through a stop-gradient, next to its
    own feed-forward torso of the observation (the value loss never reaches the core); shared: the core, trained by
    both losses (purejaxrl's ppo_rnn); separate: its own torso and core, batched with the actor's (~2x the compute);
    auto: the cell's measured default, detached for gru, separate for lstm (docs/performance.md, Recurrent learning
    parity). A shared core saturates under large, constant value targets (docs/library.md, Recurrent policies)."""
    bptt_len: int = 0
    """Recurrent update: length of the sequences gradients flow through (0: the whole rollout, num_steps). Shorter
    chunks start from the carries stored during the rollout; num_steps must be a multiple of it."""
    normalize_obs: bool = False
    normalize_reward: bool = False
    num_devices: int = 1
    """Data-parallel devices: each runs num_envs/num_devices envs; gradients are averaged across devices."""
    language: str = "none"
    """Language in the policy: none, or minilm: the frozen MiniLM sentence embedding of the step's message (captioned
    JAX tasks, NetHack/MiniHack), projected by a Dense(language_dim) and fused into the torso input
    (jaxrl_pref/language.py, docs/language.md)."""
    language_dim: int = 32
    """Width of the trained projection of the message embedding (--language minilm)."""

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
        require(self.network in NETWORKS, "network", f"unknown network {self.network!r}",
                f"use one of {', '.join(NETWORKS)}")
        positive(self, "rnn_hidden", "language_dim")
        require(self.language in LANGUAGES, "language", f"unknown language {self.language!r}",
                f"use one of {', '.join(LANGUAGES)}")
        require(self.critic in CRITICS, "critic", f"unknown critic {self.critic!r}", f"use one of {', '.join(CRITICS)}")
        require(self.network != "mlp" or self.critic == "auto", "critic",
                "applies to recurrent networks (gru, lstm); the mlp's critic always has its own layers",
                "drop --critic, or pass --network gru/lstm")
        positive(self, "bptt_len", strict=False)
        require(self.num_envs % self.num_devices == 0, "num_envs",
                f"{self.num_envs} envs cannot be split evenly over {self.num_devices} devices",
                f"use a multiple of num_devices, e.g. --num-envs {self.num_devices * max(1, self.num_envs // self.num_devices)}")
        batch = self.device_batch
        require(batch % self.num_minibatches == 0, "num_minibatches",
                f"per-device batch num_steps*num_envs/num_devices = {batch} is not divisible into "
                f"{self.num_minibatches} minibatches",
                f"pick num_minibatches dividing {batch}, e.g. {_divisor_near(batch, self.num_minibatches)}")
        if self.network != "mlp":
            require(self.num_steps % self.seq_len == 0, "bptt_len",
                    f"num_steps={self.num_steps} is not a multiple of bptt_len={self.bptt_len}",
                    f"pick a bptt_len dividing {self.num_steps}, e.g. {_divisor_near(self.num_steps, self.bptt_len)}, "
                    "or 0 (whole rollouts)")
            seqs = self.envs_per_device * (self.num_steps // self.seq_len)
            require(seqs % self.num_minibatches == 0, "num_minibatches",
                    f"the recurrent update splits whole sequences: {seqs} per device (num_envs/num_devices x "
                    f"num_steps/bptt_len) do not divide into {self.num_minibatches} minibatches",
                    f"pick num_minibatches dividing {seqs}, e.g. {_divisor_near(seqs, self.num_minibatches)}, or "
                    "more envs, or a shorter --bptt-len")
        require(self.total_timesteps >= self.steps_per_update, "total_timesteps",
                f"{self.total_timesteps} is less than one update's batch ({self.steps_per_update} steps)",
                f"use at least {self.steps_per_update}")
        envs.check_name(self.env_name)  # a registry lookup: builds no env

    # the run's shape, computed here once and handed on (the runner, the loops, the bonus, the logs)
    @property
    def envs_per_device(self) -> int:
        """Envs each data-parallel device steps: ``num_envs / num_devices``."""
        return self.num_envs // self.num_devices

    @property
    def steps_per_update(self) -> int:
        """Env steps of one update (per seed, over all devices): ``num_steps * num_envs``."""
        return self.num_steps * self.num_envs

    @property
    def device_batch(self) -> int:
        """Transitions each device learns from per update: ``num_steps * num_envs / num_devices``."""
        return self.num_steps * self.envs_per_device

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def minibatch_size(self) -> int:
        return self.device_batch // self.num_minibatches

    @property
    def optimizer_steps_per_update(self) -> int:
        """Gradient steps of one update: ``update_epochs * num_minibatches`` (the learning-rate schedule's unit)."""
        return self.update_epochs * self.num_minibatches

    @property
    def critic_kind(self) -> str:
        """The recurrent critic this config builds: ``critic``, with auto resolved per cell (:data:`AUTO_CRITIC`)."""
        return AUTO_CRITIC.get(self.network, "detached") if self.critic == "auto" else self.critic

    @property
    def seq_len(self) -> int:
        """Steps per sequence in the recurrent update: bptt_len, or the whole rollout."""
        return self.bptt_len or self.num_steps


NETWORKS = ("mlp", "gru", "lstm")
CRITICS = ("auto", "detached", "shared", "separate")
# critic=auto per cell, from the parity table (docs/performance.md): the LSTM with the detached critic fell below
# purejaxrl on CartPole (294 vs 500, 4 seeds) where the separate critic reached 500 and held Acrobot (-86)
AUTO_CRITIC = {"gru": "detached", "lstm": "separate"}


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


# Defaults of PPO on a NetHack/MiniHack pool (host loop), sized for 2 CPU cores; the CLI applies them for those envs.
HOST_DEFAULTS = dict(num_envs=16, num_steps=32, total_timesteps=1_000_000, learning_rate=3e-4, update_epochs=2,
                     num_minibatches=2)


def host_config(**fields) -> Config:
    """A Config with the NetHack/MiniHack pool defaults (:data:`HOST_DEFAULTS`), ``fields`` overriding them."""
    return Config(**{**HOST_DEFAULTS, "env_name": "NetHackScore-v0", **fields})

HPARAM_FIELDS = vmappable_fields(Config)
HParams = hparams_class(Config)
HParams.__doc__ = """The vmappable fields of :class:`Config` as traced values, so they can be vmapped. Build with
:func:`hparams`."""


def hparams(cfg: Config, **overrides) -> HParams:
    """HParams from ``cfg``; ``overrides`` may be arrays with a leading sweep axis. All leaves are broadcast to
    that common leading shape so ``jax.vmap(train)(keys, hp)`` maps over them together."""
    return build_hparams(HParams, cfg, overrides)


def check_env(cfg: Config, host: bool = False) -> None:
    """Checks ``cfg`` against its env (a known name; a host env's limits); raises ConfigError naming the field."""
    envs.check_name(cfg.env_name)
    _language.check(cfg.language, cfg.env_name, host, cfg.network)
    if host:
        for name in ("normalize_obs", "normalize_reward"):
            require(not getattr(cfg, name), name, f"not supported on the host env {cfg.env_name}",
                    f"drop --{name.replace('_', '-')}")
        require(cfg.num_devices == 1, "num_devices", "the host loop runs on one device", "pass --num-devices 1")


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
    policy_state: Any = ()
    """A recurrent policy's :class:`~jaxrl_pref.recurrent.RecurrentState` after the last step; ``()`` for an MLP."""


@struct.dataclass
class TrainOutput:
    train_state: TrainState
    metrics: dict
    runner_state: RunnerState


class PPO:
    """PPO learner for one env interface. Usable from jitted (Anakin) and host-side (Sebulba) loops.

    All methods are pure; ``axis_name`` names the device axis to average gradients over (data-parallel).
    """

    def __init__(self, cfg: Config, spec: envs.EnvSpec, network=None, streams: tuple[Stream, ...] = SINGLE):
        """``network`` maps a batch of observations to (policy parameters, value); default: an MLP
        :class:`ActorCritic` for array observations, a :class:`NetHackEncoder` one for dict observations.

        With ``cfg.network`` "gru" or "lstm" the default is a :class:`RecurrentActorCritic` (maps ``(carry,
        obs[T, B], start[T, B])`` to ``(carry, pi, value)``); an :class:`EncoderActorCritic` given as ``network``
        then has its encoder put in front of the recurrent core (encoder -> core -> linear heads).

        ``streams``: the reward streams the reward transform returns (:func:`~jaxrl_pref.rewards.reward_streams`).
        With more than one the critic has a value head per stream (``value[..., K]``), each stream its own return
        (its discount; episodic or not) and the policy follows the sum of their advantages."""
        self.cfg, self.spec, self.streams = cfg, spec, tuple(streams)
        heads = len(self.streams)
        rnn = cfg.network != "mlp"
        if network is None and isinstance(spec.obs_shape, dict):
            network = EncoderActorCritic(spec.num_actions, NetHackEncoder())
        if cfg.language != "none":  # the message embedding fused into the input (jaxrl_pref/language.py)
            network = _language.network(cfg, spec, network)
        if rnn and isinstance(network, EncoderActorCritic):
            network = RecurrentActorCritic(network.num_actions, True, tuple(cfg.hidden), cfg.activation,
                                           cfg.network, cfg.rnn_hidden, encoder=network.encoder,
                                           critic=cfg.critic_kind)
        if network is None:
            network = (RecurrentActorCritic(spec.num_actions, spec.discrete, tuple(cfg.hidden), cfg.activation,
                                            cfg.network, cfg.rnn_hidden, critic=cfg.critic_kind) if rnn else
                       ActorCritic(spec.num_actions, spec.discrete, tuple(cfg.hidden), cfg.activation))
        if heads > 1:
            if not hasattr(network, "value_heads"):
                raise ValueError(f"PPO: the reward has {heads} streams ({', '.join(s.name for s in self.streams)}) "
                                 f"but the network {type(network).__name__} has no value_heads field to give each "
                                 "its value head")
            network = network.clone(value_heads=heads)
        self.network = network
        self.recurrent = hasattr(network, "initialize_carry")
        if rnn and not self.recurrent:
            raise ValueError(f"PPO: network={cfg.network!r} but the given network {type(network).__name__} is "
                             "feed-forward; pass a RecurrentActorCritic, or an EncoderActorCritic (its encoder goes "
                             "in front of the core)")

    def optimizer(self, hp: HParams) -> optax.GradientTransformation:
        cfg = self.cfg
        if cfg.anneal_lr:
            def lr(count):
                frac = 1.0 - (count // cfg.optimizer_steps_per_update) / cfg.num_updates
                return hp.learning_rate * frac
        else:
            lr = hp.learning_rate
        return optax.chain(optax.clip_by_global_norm(hp.max_grad_norm), optax.adam(lr, eps=1e-5))

    def init(self, key, hp: HParams) -> TrainState:
        if self.recurrent:
            ps = self.initial_policy_state(1)
            params = self.network.init(key, ps.carry, _with_time(self.spec.dummy_obs()), ps.start[None])
        else:
            params = self.network.init(key, self.spec.dummy_obs())
        return TrainState(params, self.optimizer(hp).init(ravel_pytree(params)[0]))

    def initial_policy_state(self, num_envs: int):
        """The policy state before the first step of ``num_envs`` envs: ``()`` for a feed-forward network, else a
        :class:`~jaxrl_pref.recurrent.RecurrentState` (zero carry; every env starts an episode)."""
        if not self.recurrent:
            return ()
        return RecurrentState(self.network.initialize_carry((num_envs,)), jnp.ones((num_envs,), bool))

    def act(self, params, obs, key, policy_state=()):
        """Samples actions: returns (action, log_prob, value) for a batch of observations. Recurrent: pass the
        ``policy_state`` entering the step (:meth:`initial_policy_state`, then ``RecurrentState(carry, done)``);
        returns (action, log_prob, value, carry) with the core's carry after the step."""
        if not self.recurrent:
            pi, value = self.network.apply(params, obs)
            dist = distribution(pi, self.spec.discrete)
            action, log_prob = dist.sample_and_log_prob(seed=key)
            return action, log_prob, value
        carry, pi, value = self.network.apply(params, policy_state.carry, _with_time(obs), policy_state.start[None])
        dist = distribution(jax.tree.map(lambda x: x[0], pi), self.spec.discrete)
        action, log_prob = dist.sample_and_log_prob(seed=key)
        return action, log_prob, value[0], carry

    def value(self, params, obs, policy_state=()):
        if not self.recurrent:
            return self.network.apply(params, obs)[1]
        return self.network.apply(params, policy_state.carry, _with_time(obs), policy_state.start[None])[2][0]

    def targets(self, params, hp: HParams, traj: Transition, reward, last_obs, last_policy_state=()):
        """(advantages, returns) for a time-major rollout, bootstrapping truncated steps from V(final_obs).

        Recurrent: ``last_policy_state`` is the state after the rollout; ``V(final_obs[t])`` uses the carry after
        step ``t`` (the stored carry entering step ``t + 1``, or the last one), without a reset."""
        last_value = self.value(params, last_obs, last_policy_state)
        if not self.cfg.bootstrap_truncated:
            vf = None
        elif self.recurrent:
            after = jax.tree.map(lambda c, last: jnp.concatenate([c[1:], last[None]]), traj.policy_state.carry,
                                 last_policy_state.carry)
            vf = partial(self._value_after, params, after)
        else:
            vf = partial(self.value, params)
        nxt = next_values(traj, last_value, vf)
        if len(self.streams) == 1:
            return gae(reward, traj.value, nxt, traj.terminated, traj.done, hp.gamma, hp.gae_lambda)
        # one return per stream ([T, N, K]); a non-episodic stream runs on across episode ends, bootstrapping the
        # next step's value (the new episode's first observation), as Burda et al.'s intrinsic return
        episodic = jnp.array([s.episodic for s in self.streams])
        gamma = jnp.stack([jnp.asarray(hp.gamma if s.gamma is None else s.gamma, jnp.float32) for s in self.streams])
        nxt = jnp.where(episodic, nxt, jnp.concatenate([traj.value[1:], last_value[None]]))
        return gae(reward, traj.value, nxt, traj.terminated[..., None] & episodic, traj.done[..., None] & episodic,
                   gamma, hp.gae_lambda)

    def _value_after(self, params, carry, obs):
        """V(obs[t, b]) with the carry ``carry[t, b]`` and no reset: one batched call over ``[T * B]``."""
        T, B = jax.tree.leaves(carry)[0].shape[:2]
        flat = lambda x: x.reshape((T * B,) + x.shape[2:])  # noqa: E731
        obs = jax.tree.map(lambda x: flat(x)[None], obs)
        v = self.network.apply(params, jax.tree.map(flat, carry), obs, jnp.zeros((1, T * B), bool))[2]
        return v.reshape((T, B) + v.shape[2:])

    def update(self, state: TrainState, hp: HParams, traj: Transition, advantages, returns, key,
               axis_name: Optional[str] = None):
        """``update_epochs`` passes of minibatch SGD over the batch. Returns (state, mean loss metrics).

        Feed-forward: minibatches of single steps. Recurrent: minibatches of whole env sequences (envs permuted,
        not steps; with ``bptt_len`` the rollout is cut into chunks of that length), the core re-run over each from
        the carry stored at its start."""
        cfg = self.cfg
        tx = self.optimizer(hp)
        if self.recurrent:
            minibatches, forward = self._sequences(traj, advantages, returns)
        else:
            batch = (traj.obs, traj.action, traj.log_prob, traj.value, advantages, returns)
            batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
            n = jax.tree.leaves(batch)[0].shape[0]

            def minibatches(key):
                perm = shuffle_indices(key, n)
                return jax.tree.map(lambda x: jnp.take(x, perm, axis=0).reshape(
                    (cfg.num_minibatches, -1) + x.shape[1:]), batch)

            def forward(params, mb):
                obs, *rest = mb
                return (*self.network.apply(params, obs), *rest)

        def loss_fn(params, mb):
            pi, value, action, old_log_prob, old_value, adv, ret = forward(params, mb)
            if len(self.streams) > 1:  # the policy follows the streams' summed advantage; the heads' losses add
                adv = adv.sum(-1)
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
            return jax.lax.scan(minibatch_step, carry, minibatches(key))

        (flat, opt_state), metrics = jax.lax.scan(epoch, (flat0, state.opt_state),
                                                  jax.random.split(key, cfg.update_epochs))
        state = TrainState(unravel(flat), opt_state)
        heads = metrics.pop("loss/value_heads", None)
        if heads is not None:  # one value loss per reward stream, by the stream's name
            heads = heads.reshape(-1, len(self.streams)).mean(0)
            metrics.update({f"loss/value_{s.name}": heads[i] for i, s in enumerate(self.streams)})
        metrics = jax.tree.map(jnp.mean, metrics)
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        return state, metrics

    def _sequences(self, traj: Transition, advantages, returns):
        """The recurrent update's data: ``(minibatches(key), forward(params, minibatch))``.

        The rollout ``[T, B]`` is cut into ``T / L`` chunks of ``L = seq_len`` steps: ``S = B * T / L`` sequences,
        time-major ``[L, S]``, each with the carry stored at its first step. ``minibatches`` permutes the sequences
        and splits them into ``[num_minibatches, L, S / num_minibatches]``."""
        cfg = self.cfg
        T, B = traj.reward.shape[:2]
        L = cfg.seq_len
        K = T // L

        def seqs(x):  # [T, B, ...] -> [L, K * B, ...]: sequence k * B + b is env b's chunk k
            x = jnp.swapaxes(x.reshape((K, L) + x.shape[1:]), 0, 1)
            return x.reshape((L, K * B) + x.shape[3:])

        ps = traj.policy_state
        data = jax.tree.map(seqs, (traj.obs, ps.start, traj.action, traj.log_prob, traj.value, advantages, returns))
        carry0 = jax.tree.map(lambda c: c[::L].reshape((K * B,) + c.shape[2:]), ps.carry)
        n, m = K * B, cfg.num_minibatches

        def minibatches(key):
            perm = shuffle_indices(key, n)
            carry = jax.tree.map(lambda x: jnp.take(x, perm, axis=0).reshape((m, -1) + x.shape[1:]), carry0)
            mbs = jax.tree.map(lambda x: jnp.moveaxis(jnp.take(x, perm, axis=1).reshape((L, m, -1) + x.shape[2:]),
                                                      1, 0), data)
            return carry, mbs

        def forward(params, mb):
            carry, (obs, start, *rest) = mb
            _, pi, value = self.network.apply(params, carry, obs, start)
            return (pi, value, *rest)

        return minibatches, forward

    def learn(self, state: TrainState, reward, reward_state, hp: HParams, traj: Transition, last_obs, key_reward,
              key_update, axis_name: Optional[str] = None, last_policy_state=()):
        """Learns from one rollout, in the Anakin step and the host loop alike: reward-model update -> learning
        reward (the reward-transform seam) -> advantages -> PPO epochs. Returns (state, reward_state, metrics).
        ``last_policy_state``: a recurrent policy's state after the rollout (for ``V(last_obs)``)."""
        reward_state, learning_reward, reward_metrics = update_and_reward(reward, reward_state, traj, key_reward,
                                                                          axis_name)
        adv, ret = self.targets(state.params, hp, traj, learning_reward, last_obs, last_policy_state)
        state, loss_metrics = self.update(state, hp, traj, adv, ret, key_update, axis_name)
        return state, reward_state, {**episode_metrics(traj.info, axis_name), **loss_metrics, **reward_metrics}


def _with_time(obs):
    """Observations ``[B, ...]`` as a one-step sequence ``[1, B, ...]``."""
    return jax.tree.map(lambda x: x[None], obs)


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
    n = cfg.envs_per_device if num_envs is None else num_envs
    axis = distributed.DATA_AXIS if cfg.num_devices > 1 else None  # normalisers share statistics across devices
    env, params = envs.make(cfg.env_name, num_envs=n, normalize_obs=cfg.normalize_obs,
                            normalize_reward=cfg.normalize_reward, gamma=cfg.gamma, axis_name=axis)
    return _language.wrap_env(env, cfg), params  # --language: the message id appended to the obs


class Trainer(ScanLoop):
    """PPO's chunked Anakin loop: a :class:`~jaxrl_pref.loop.ScanLoop` over :meth:`init_state` and :meth:`step`.

    ``init(key, hp) -> RunnerState`` and ``run(state, hp, n) -> (state, metrics)`` are pure and jittable (``n``
    static). With ``cfg.num_devices > 1`` they run under ``shard_map`` over a 1-D device mesh: envs are split
    across devices, parameters are replicated, gradients averaged. Seeds and hyperparameters: ``jax.vmap`` over
    ``init``/``run`` (or ``make_train``) with ``num_devices == 1``; with more devices run seeds one after another.
    """

    def __init__(self, cfg: Config, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1, network=None):
        self.cfg = cfg
        self.env, self.env_params = make_env(cfg)
        self.spec = envs.spec(self.env, self.env_params)
        self.reward = reward if reward is not None else IdentityReward()
        self.agent = PPO(cfg, self.spec, network, reward_streams(self.reward))
        # train state, reward state and step replicated; env state/obs split over envs (the normalisers'
        # statistics replicated); keys per device
        D, R = distributed.SPLIT, distributed.REPLICATED
        super().__init__(self.init_state, self.step, partial(hparams, cfg), lambda rs: rs.update_step,
                         log_fn=log_fn, log_every=log_every, num_devices=cfg.num_devices,
                         state_specs=RunnerState(R, self.env.state_specs(D, R), D, R, D, R, D))

    def init_state(self, key, hp: HParams, axis_name: Optional[str] = None) -> RunnerState:
        k_params, k_reward, k_env, k_run = jax.random.split(key, 4)
        if axis_name is not None:  # identical params everywhere, different envs per device
            k_env = jax.random.fold_in(k_env, jax.lax.axis_index(axis_name))
            k_run = jax.random.fold_in(k_run, jax.lax.axis_index(axis_name))
        train_state = self.agent.init(k_params, hp)
        obs, env_state = self.env.reset(k_env, self.env_params)
        return RunnerState(train_state, env_state, obs, self.reward.init(k_reward, self.spec), k_run,
                           jnp.int32(0), self.agent.initial_policy_state(self.cfg.envs_per_device))

    def step(self, rs: RunnerState, hp: HParams, axis_name: Optional[str] = None):
        """One update: an in-jit rollout of ``num_steps`` steps, then :meth:`PPO.learn`."""
        key, k_roll, k_reward, k_upd = jax.random.split(rs.key, 4)
        policy = partial(self.agent.act, rs.train_state.params)
        # the rollout's keys hash unrolled (same bits, see jaxrl_pref.prng): its per-step hashes (the policy's
        # sample, the env step's splits) are otherwise most of a cheap env step's cost on CPU
        out = collect(self.env, self.env_params, policy, rs.env_state, rs.obs, prng.unrolled(k_roll),
                      self.cfg.num_steps, policy_state=rs.policy_state)
        env_state, obs, traj, ps = out if self.agent.recurrent else (*out, ())
        train_state, reward_state, metrics = self.agent.learn(rs.train_state, self.reward, rs.reward_state, hp,
                                                              traj, obs, k_reward, k_upd, axis_name, ps)
        return RunnerState(train_state, env_state, obs, reward_state, key, rs.update_step + 1, ps), metrics


def make_trainer(cfg: Config, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1, *, network=None,
                 chunk_hook: Optional[Callable] = None) -> Trainer:
    """PPO's chunked Anakin trainer on ``cfg.env_name`` for :func:`jaxrl_pref.runner.run_experiment`.
    ``chunk_hook``: host work the runner runs between compiled chunks (see :mod:`jaxrl_pref.runner`; ONI on
    captioned JAX envs). ``network``: the policy network (default: from the env's observations, see :class:`PPO`).
    On a host env (a NetHack/MiniHack pool, ``JaxHostEnv``): :func:`agents.ppo_host.make_trainer`."""
    trainer = Trainer(cfg, reward, log_fn, log_every, network)
    trainer.chunk_hook = chunk_hook
    return trainer


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
