"""Train HERON (PPO on a preference reward model from ranked reward factors) on any env with reward factors.

    python -m experiments.heron --env Pendulum-v1 --factors 'angle>speed>energy' --margins 0.5 1 1 --num-seeds 4
    python -m experiments.heron --env MountainCarContinuous-v0 --factors goal energy --margins 0 1
    python -m experiments.heron --env MiniHack-Room-5x5-v0 --factors 'depth>damage>steps' --margins 0 0 1
    python -m experiments.heron --resume runs/heron-x        # continue a run (options read from its config.json)

``--factors`` ranks the env's reward factors, most important first, as ``'a>b>c'`` (quote it: ``>`` is a shell
redirect) or as separate words; ``--margins`` gives one margin per ranked factor (a multiple of the factor's std
over the reward model's buffer, or absolute with ``--absolute-margins``). JAX factor envs (``Pendulum-v1`` maps to
``PendulumFactors-v1``) train in the jitted loop, seeds vmapped; NetHack/MiniHack envs in the host loop with the
factors ``depth``, ``gold``, ``damage``, ``steps`` computed from ``blstats``. Outputs, resume and exit status as
``experiments.ppo``. Logged: the true ``episode_return``, per-episode factor totals (``episode_factor_*``) and the
reward model's loss/accuracy/margins (``reward/heron_*``).
"""
from __future__ import annotations

import dataclasses

from jaxrl_pref import cli

cli.setup()  # before JAX starts

from agents import heron, ppo  # noqa: E402
from experiments import launch  # noqa: E402
from envs.factors import factor_env_name  # noqa: E402
from jaxrl_pref.rewards.preference import PreferenceConfig  # noqa: E402

# HERON's reward-model sizes on a NetHack/MiniHack pool (2 CPU cores)
HOST_DEFAULTS = dict(factors=("depth", "damage", "steps"), margins=(0.0, 0.0, 1.0), buffer_segments=256,
                     min_segments=32, rm_batch_size=16)


def resolve(opts) -> dict:
    """A gymnax id with a factor variant trains on it (``Pendulum-v1`` -> ``PendulumFactors-v1``)."""
    return {"ppo": dataclasses.replace(opts.ppo, env_name=factor_env_name(opts.env_name))}


def check(opts) -> None:
    agent_config(opts)  # HERON's own checks (heron.Config.validate): the env's factors, the ranking, the rollout
    launch.check_ppo(opts)


def agent_config(opts) -> heron.Config:
    """The :class:`agents.heron.Config` (PPO's fields + the reward model's) of these options: what a library user
    declares in one go, so the CLI and the library build HERON's reward model the same way
    (:func:`agents.heron.reward_model`); on a NetHack/MiniHack env its factors are :data:`envs.factors.MINIHACK`."""
    return heron.Config(**vars(opts.ppo), **vars(opts.heron))


SPEC = cli.Experiment(
    name="heron", module="experiments.heron", doc=__doc__,
    sections=(*launch.PPO_SECTIONS, cli.Section("heron", PreferenceConfig), launch.RUN),
    train=lambda opts, run_dir: launch.train_ppo(opts, run_dir, reward=heron.reward_model(agent_config(opts))),
    default_env="PendulumFactors-v1", resolve=resolve, check=check, hparam_fields=ppo.HPARAM_FIELDS, errors=(ImportError,),
    defaults=lambda env, host: {**launch.ppo_defaults(env, host), **(HOST_DEFAULTS if host else {})})


parse, main = cli.entry_points(SPEC)

if __name__ == "__main__":
    raise SystemExit(main())
