"""PPO on a host env (the interface in :mod:`envs.host`: a NetHack/MiniHack pool, ``JaxHostEnv``): the host loop
(Sebulba) around the same learner as the jitted loop (:class:`agents.ppo.PPO`, its ``learn`` jitted), one seed per
process::

    from agents import ppo, ppo_host
    pool = envs.make("MiniHack-Room-5x5-v0", num_envs=16, seed=0)[0]
    trainer = ppo_host.make_trainer(ppo.host_config(env_name="MiniHack-Room-5x5-v0"), pool)
    state = trainer.init(jax.random.PRNGKey(0)); state, metrics = trainer.run(state, None, 10)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from agents.ppo import PPO, Config, HParams, TrainState, hparams
from envs.host import host_spec
from envs.nethack import PoolConfig
from envs.errors import require
from jaxrl_pref.language import wrap_host_env
from jaxrl_pref.loop import HostLoop, LogFn, env_groups, host_rollout
from jaxrl_pref.networks import NetHackNetConfig
from jaxrl_pref.recurrent import RecurrentState
from jaxrl_pref.rewards import IdentityReward
from jaxrl_pref.rewards.transform import reward_streams
from jaxrl_pref.rollout import Transition
from jaxrl_pref.transfer import ObsPacker, pack_outputs, unpack_outputs


@struct.dataclass
class HostState:
    """What the host loop carries between updates (device side); a checkpoint is this pytree."""
    train_state: TrainState
    reward_state: Any
    key: jax.Array
    update_step: jax.Array


_TAIL_BYTES = 17  # packed with each step's observations: the rbg key (4 uint32) and the recurrent reset flag


class HostTrainer(HostLoop):
    """PPO on a host env (the interface in :mod:`envs.host`): a :class:`~jaxrl_pref.loop.HostLoop` over
    :meth:`collect` (the jitted ``act`` on the host, :func:`~jaxrl_pref.loop.host_rollout`) and the same
    :meth:`PPO.learn` as the Anakin step, jitted. ``init(key, hp) -> HostState``; ``run(state, hp, num_updates)
    -> (state, metrics)`` with ``[num_updates]`` numpy metrics (the Anakin trainer's keys plus ``env_steps_per_s``
    and the host hook's); ``hp`` is ignored there: the hyperparameters come from ``cfg``.

    ``host_hook(state, traj) -> (state, host_metrics)`` runs on the host after each rollout, before its update (e.g.
    ONI: send new messages to the annotator, load new labels into ``state.reward_state``); its metrics (plain
    floats) are logged with the update's. ``overlap=True`` collects the next rollout with the previous parameters
    while the update runs (one update of policy lag, corrected by PPO's importance ratio since the behaviour
    log-probs are stored). An env with ``num_groups > 1`` (``NLEPool(num_groups=2)``) is stepped pipelined: the
    policy acts on one group's observations while the workers step the other; the batch is the same
    ``[num_steps, num_envs]``."""

    def __init__(self, cfg: Config, env, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1,
                 overlap: bool = False, network=None, host_hook: Optional[Callable] = None, actor_device: int = -1):
        require(env.num_envs == cfg.num_envs, "num_envs", f"the host env steps {env.num_envs} envs and the config says "
                f"{cfg.num_envs}", f"make the env with num_envs={cfg.num_envs} (one number for the batch and the pool)")
        env = wrap_host_env(env, cfg.language)  # --language: obs["language"], the message's embedding
        self.cfg, self.env = cfg, env
        # acting on another device than the learner's: parameters go there once per rollout, the rollout comes
        # back to the learner in one transfer per update
        self._actor = jax.devices()[actor_device] if actor_device >= 0 else None
        self._learner = jax.devices()[0]
        self.spec = host_spec(env)
        self.reward = reward if reward is not None else IdentityReward()
        self.agent = PPO(cfg, self.spec, network, reward_streams(self.reward))
        self.hp = hparams(cfg)
        # the policy's random draws use XLA's RngBitGenerator (an "rbg" key, 4 uint32 words, made from the rollout
        # key on the host): threefry's bits are a while loop of small ops, which on CPU cost more than the whole
        # forward pass (8 envs: 240 us per act with threefry, 145 us with rbg; 66 us vs 217 us with glyph_dim 8)
        # one transfer each way per step: the observations, the step's key and a recurrent policy's reset flags go
        # up packed in one uint8 buffer, the action, log-prob and value come back in one float32 array
        # (jaxrl_pref.transfer); the carry stays on the device
        self._packer = ObsPacker(env.observation_spec(), tail_bytes=_TAIL_BYTES)
        self._act = jax.jit(self._act_packed)
        self._unpack = jax.jit(self._packer.unpack)
        # the parameters and optimiser state are donated (updated in place) unless overlap still reads them while
        # the update runs; the reward state is not (a host hook such as ONI's keeps references into it)
        self._learn_train = jax.jit(self._learn_step, donate_argnums=() if overlap else 0)
        self._obs = None  # the env's current observations: reset before the first rollout, then carried on
        self._policy_state = ()  # a recurrent policy's state after the last step (reset with the env)
        hook = None if host_hook is None else (lambda state, batch: host_hook(state, batch[0]))
        super().__init__(self._collect_batch, lambda state, batch: self._learn(state, batch),
                         lambda state: int(state.update_step), self._rate, log_fn=log_fn, log_every=log_every,
                         overlap=overlap, host_hook=hook)

    def init(self, key, hp: Optional[HParams] = None) -> HostState:
        k_params, k_reward, k_run = jax.random.split(key, 3)
        return HostState(self.agent.init(k_params, self.hp if hp is None else hp),
                         self.reward.init(k_reward, self.spec), k_run, jnp.int32(0))

    def _act_packed(self, params, buf, carry=None):
        tail = self._packer.tail(buf[0])
        key = jax.random.wrap_key_data(jax.lax.bitcast_convert_type(tail[:16].reshape(4, 4), jnp.uint32),
                                       impl="rbg")
        obs = self._packer.unpack(buf)
        if carry is None:
            return pack_outputs(*self.agent.act(params, obs, key))
        start = self._packer.tail(buf)[:, 16] != 0
        action, log_prob, value, carry = self.agent.act(params, obs, key, RecurrentState(carry, start))
        return pack_outputs(action, log_prob, value), carry

    def _upload(self, keys):
        """``upload`` for :func:`host_rollout`: packs step ``t``'s observations, key and reset flags, one
        ``device_put``."""
        T = keys.shape[0]

        def upload(obs, t, g, start):
            b = next(iter(obs.values())).shape[0]
            tail = np.zeros((b, _TAIL_BYTES), np.uint8)
            if t < T:
                tail[:, :16] = keys[t, g].view(np.uint8)
            if start is not None:
                tail[:, 16] = start
            return jax.device_put(self._packer.pack(obs, tail), self._actor)
        return upload

    def collect(self, params, key):
        """One rollout of ``num_steps`` host steps with the jitted policy. Returns (traj, last_obs); a recurrent
        policy's state after the rollout is then in ``self.policy_state`` (carried per env across rollouts)."""
        env, T, G = self.env, self.cfg.num_steps, env_groups(self.env)
        if self._obs is None:
            self._obs = env.reset()
            self._policy_state = self.agent.initial_policy_state(env.num_envs)
        # per-step keys as host arrays: indexing a device array costs a dispatch per step (~0.4 ms on CPU); each
        # is the data of an rbg key (two threefry keys' words, see __init__)
        keys = np.asarray(jax.random.key_data(jax.random.split(key, 2 * T * G))).reshape(T, G, 4)
        upload = self._upload(keys)
        if self._actor is not None:
            params = jax.device_put(params, self._actor)
            self._policy_state = jax.device_put(self._policy_state, self._actor)
        if self.agent.recurrent:
            def policy(buf, t, g, ps):
                out, carry = self._act(params, buf, ps.carry)
                action, log_prob, value = unpack_outputs(out)
                return action, carry, log_prob, value
            s, self._obs, self._policy_state = host_rollout(env, policy, self._obs, T, G, upload=upload,
                                                            policy_state=self._policy_state)
        else:
            policy = lambda buf, t, g: unpack_outputs(self._act(params, buf))  # noqa: E731
            s, self._obs = host_rollout(env, policy, self._obs, T, G, upload=upload)
        log_prob, value = s.extras
        traj = Transition(self._unpack(s.obs), s.action, log_prob, value, s.reward.astype(np.float32),
                          s.terminated.astype(bool), s.truncated.astype(bool), self._unpack(s.final_obs), s.info,
                          s.policy_state)
        return traj, self._unpack(s.last_obs)

    @property
    def policy_state(self):
        """A recurrent policy's state after the last collected step (``()`` for a feed-forward policy)."""
        return self._policy_state

    def _collect_batch(self, state: HostState, ahead: bool):
        key = jax.random.fold_in(state.key, 7)
        traj, last_obs = self.collect(state.train_state.params, jax.random.fold_in(key, 1) if ahead else key)
        batch = (traj, last_obs, self._policy_state)
        return batch if self._actor is None else jax.device_put(batch, self._learner)

    def _learn(self, state: HostState, batch):
        train_state, rest, metrics = self._learn_train(state.train_state, state.replace(train_state=None), *batch)
        return rest.replace(train_state=train_state), metrics

    def _learn_step(self, train_state, state: HostState, traj: Transition, last_obs, last_policy_state=()):
        key, k_reward, k_upd = jax.random.split(state.key, 3)
        train_state, reward_state, metrics = self.agent.learn(train_state, self.reward, state.reward_state,
                                                              self.hp, traj, last_obs, k_reward, k_upd,
                                                              last_policy_state=last_policy_state)
        return train_state, HostState(None, reward_state, key, state.update_step + 1), metrics

    def _rate(self, seconds: float) -> dict:
        return {"env_steps_per_s": np.float32(self.cfg.steps_per_update / max(seconds, 1e-9))}


def make_trainer(cfg: Config, env, reward=None, log_fn: Optional[LogFn] = None, log_every: int = 1, *,
                 network=None, overlap: bool = False, host_hook: Optional[Callable] = None,
                 actor_device: int = -1) -> HostTrainer:
    """PPO's host-loop trainer on ``env`` for :func:`jaxrl_pref.runner.run_experiment` (:class:`HostTrainer`;
    ``actor_device``: an index in ``jax.devices()``, -1 for the learner's)."""
    return HostTrainer(cfg, env, reward, log_fn, log_every, overlap, network, host_hook, actor_device)


def pool_trainer(cfg: Config, pool, pool_cfg: PoolConfig = PoolConfig(), net: NetHackNetConfig = NetHackNetConfig(),
                 reward=None, host_hook: Optional[Callable] = None, log_fn: Optional[LogFn] = None,
                 log_every: int = 1) -> HostTrainer:
    """PPO on a NetHack/MiniHack ``pool`` (from ``pool_cfg.make_pool``) with the NetHack network ``net``: what
    ``python -m experiments.ppo --env MiniHack-...`` trains (the pool's ``overlap`` and ``actor_device`` apply)."""
    return make_trainer(cfg, pool, reward, log_fn, log_every, network=net.network(pool.num_actions),
                        overlap=pool_cfg.overlap, host_hook=host_hook, actor_device=pool_cfg.actor_device)
