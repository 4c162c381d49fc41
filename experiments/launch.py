"""The entry points' shared wiring: train any agent on any env from parsed command-line options
(:mod:`jaxrl_pref.cli`); the entry points in ``experiments/`` declare their options and call these. The agents'
builders (:func:`agents.ppo.make_trainer`, :func:`agents.ppo_host.pool_trainer`, :func:`agents.sqirl.make_trainer`,
the reward models of HERON/ONI/Motif) take config sections, never these options.

* :func:`train_ppo`: PPO, or PPO + a reward transform (HERON, ONI). A JAX env runs in the jitted loop (seeds and
  ``--hp-values`` vmapped); a NetHack/MiniHack env gets a worker pool (:class:`envs.nethack.PoolConfig`), the
  NetHack policy network (:class:`jaxrl_pref.networks.NetHackNetConfig`) and the host loop, one seed per process.
* :func:`train_sqirl`: SQIRL in the jitted loop, or through the host loop for a pool env (or ``--host``).
* :func:`check_ppo`: the checks PPO-family options need across their sections, before anything is built.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from agents import ppo, ppo_host, sqirl
from envs.nethack import PoolConfig
from jaxrl_pref.cli import Section
from jaxrl_pref.config import RunOptions, require
from jaxrl_pref.networks import NetHackNetConfig
from jaxrl_pref.rewards.bonus import BonusConfig, with_bonus
from jaxrl_pref.runner import run_experiment

PPO_SECTIONS = (Section("ppo", ppo.Config), Section("bonus", BonusConfig, saved_if_set=True),
                Section("net", NetHackNetConfig, host_only=True), Section("pool", PoolConfig, host_only=True))
RUN = Section("run", RunOptions)


def ppo_defaults(env: str, host: bool) -> dict:
    """PPO's per-env defaults: sizes for the NetHack pool on a host env."""
    return dict(ppo.HOST_DEFAULTS) if host else {}


def check_ppo(opts) -> None:
    """Checks across a PPO-family experiment's sections: the env, the pool against the batch, the devices."""
    ppo.check_env(opts.ppo, opts.host)
    if opts.host:
        opts.pool.check(opts.ppo.num_envs)
        opts.net.check(opts.pool.obs_keys)
        if opts.pool.actor_device >= 0:
            import jax
            n = len(jax.devices())
            require(opts.pool.actor_device < n, "actor_device", f"device {opts.pool.actor_device} asked for, JAX sees "
                    f"{n} ({jax.devices()[0].platform})", f"pass --actor-device -1, or an index below {n}")
    else:
        import jax
        n = len(jax.devices())
        require(opts.ppo.num_devices <= n, "num_devices",
                f"asked for {opts.ppo.num_devices} devices but JAX sees {n} ({jax.devices()[0].platform})",
                "lower --num-devices, or on CPU start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={opts.ppo.num_devices}")


def train_ppo(opts, run_dir, reward=None, host_hook=None, run_info: Optional[dict] = None, chunk_hook=None):
    """Trains ``opts.ppo`` (with ``reward``, a RewardTransform, on host envs ``host_hook`` and on JAX envs
    ``chunk_hook``, e.g. ONI's) with the runner, adding the exploration bonus of ``opts.bonus`` (``--bonus``) to
    ``reward``; returns its :class:`~jaxrl_pref.runner.RunResult`."""
    cfg = opts.ppo
    reward = with_bonus(reward, opts.bonus, cfg.envs_per_device)
    kw = dict(opts.runner_kwargs(run_dir), num_updates=cfg.num_updates, steps_per_update=cfg.steps_per_update)
    if not opts.host:
        overrides = opts.run.hp_overrides(ppo.HPARAM_FIELDS)
        hp = ppo.hparams(cfg, **overrides) if overrides else None
        make = lambda _, log_fn=None, log_every=1: ppo.make_trainer(  # noqa: E731
            cfg, reward=reward, log_fn=log_fn, log_every=log_every, chunk_hook=chunk_hook)
        return run_experiment(make, opts.config, hp=hp, hp_batched=hp is not None,
                              run_info={**opts.run_info(), **(run_info or {})}, **kw)
    pool = opts.pool.make_pool(cfg.env_name, cfg.num_envs, opts.run.seed)
    try:
        make = lambda _, log_fn=None, log_every=1: ppo_host.pool_trainer(  # noqa: E731
            cfg, pool, opts.pool, opts.net, reward=reward, host_hook=host_hook, log_fn=log_fn, log_every=log_every)
        info = {"num_workers": pool.num_workers, "host_envs": pool.host_envs, **opts.run_info(), **(run_info or {})}
        return run_experiment(make, opts.config, run_info=info, **kw)
    finally:
        pool.close()


@dataclasses.dataclass(frozen=True)
class HostLoopOption:
    """Where SQIRL steps a JAX env."""
    host: bool = False
    """Run a JAX env through the host-env loop (envs.host.JaxHostEnv), as NetHack/MiniHack pools run."""


SQIRL_SECTIONS = (Section("sqirl", sqirl.Config), Section("loop", HostLoopOption, saved=False))


def resolve_sqirl(opts) -> dict:
    """``--total-timesteps`` given: the episodes per timestep that spend it (:meth:`agents.sqirl.Config.with_budget`)."""
    opts.sqirl.check_env()  # the horizon the budget is split over comes from the env
    return {"sqirl": opts.sqirl.with_budget()}


def check_sqirl(opts) -> None:
    if opts.loop.host:
        require(opts.run.num_seeds == 1, "num_seeds", f"host envs train one seed per process, got "
                f"{opts.run.num_seeds}", "pass --num-seeds 1 and start one process per --seed")
    cfg = opts.sqirl
    require(cfg.episodes_per_timestep <= 1 << 16, "total_timesteps",
            f"gives {cfg.episodes_per_timestep} episodes per timestep (horizon {cfg.resolved_horizon()})",
            "pass a smaller --total-timesteps, or --horizon")


def train_sqirl(opts, run_dir):
    """Trains ``opts.sqirl`` with the runner (one update = one timestep of the horizon)."""
    cfg, host = opts.sqirl, opts.host or opts.loop.host
    print(f"SQIRL: {cfg.resolved_horizon()} timesteps x {cfg.episodes_per_timestep} episodes of up to "
          f"{cfg.resolved_horizon()} steps = {cfg.num_updates * cfg.steps_per_update:,} env steps per seed"
          + (f" (from --total-timesteps {cfg.total_timesteps:,})" if cfg.total_timesteps else ""), flush=True)
    kw = dict(opts.runner_kwargs(run_dir), num_updates=cfg.num_updates, steps_per_update=cfg.steps_per_update,
              run_info={"host": host, **opts.run_info()})
    if not host:
        overrides = opts.run.hp_overrides(sqirl.HPARAM_FIELDS)
        hp = sqirl.hparams(cfg, **overrides) if overrides else None
        return run_experiment(sqirl.make_trainer, cfg, hp=hp, hp_batched=hp is not None, **kw)
    env = sqirl.host_env(cfg, opts.run.seed)
    try:
        make = lambda c, log_fn=None, log_every=1: sqirl.make_trainer(  # noqa: E731
            c, log_fn=log_fn, log_every=log_every, env=env, horizon=c.resolved_horizon())
        return run_experiment(make, cfg, **kw)
    finally:
        env.close()
